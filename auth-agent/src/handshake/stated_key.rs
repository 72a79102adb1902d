//! The WireGuard key a node states in its handshake messages: none when
//! WireGuard is off, else the key the interface uses now (it follows
//! rotations).

use tokio::sync::watch;

/// This node's WireGuard public key (base64) as its handshakes state it.
#[derive(Debug, Clone)]
pub struct StatedKey(watch::Receiver<Option<String>>);

impl StatedKey {
    /// Always `key` (tests, or a key that never rotates).
    pub fn fixed(key: Option<String>) -> Self {
        Self(watch::channel(key).1)
    }

    /// The key the WireGuard manager publishes.
    pub fn following(rx: watch::Receiver<Option<String>>) -> Self {
        Self(rx)
    }

    /// The key now.
    pub fn current(&self) -> Option<String> {
        self.0.borrow().clone()
    }
}

impl Default for StatedKey {
    /// WireGuard off.
    fn default() -> Self {
        Self::fixed(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_rotations_and_keeps_the_last_key_when_the_manager_is_gone() {
        let (tx, rx) = watch::channel(Some("k1".to_owned()));
        let k = StatedKey::following(rx);
        assert_eq!(k.current().as_deref(), Some("k1"));
        tx.send(Some("k2".into())).unwrap();
        assert_eq!(k.current().as_deref(), Some("k2"));
        drop(tx);
        assert_eq!(k.current().as_deref(), Some("k2"));
        assert_eq!(StatedKey::default().current(), None);
    }
}
