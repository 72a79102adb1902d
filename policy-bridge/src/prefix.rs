//! IP prefixes (`10.0.1.0/24`, `fd00::/64`): a node's pod CIDRs, and the
//! AllowedIPs and routes WireGuard is given.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An address block: a network address with no host bits set and a prefix
/// length (at most 32 for IPv4, 128 for IPv6). A single address is `/32` or
/// `/128`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

/// Why a prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// No `/` in it.
    #[error("{0:?} is not a prefix: want <address>/<length>, e.g. 10.0.1.0/24")]
    NoSlash(String),
    /// The part before `/` is not an address.
    #[error("{0:?}: {1:?} is not an IP address")]
    Address(String, String),
    /// The length is not a number or too long for the family.
    #[error("{0:?}: prefix length {1:?} is not 0..={2}")]
    Length(String, String, u8),
    /// Bits are set past the prefix length.
    #[error("{0:?} has host bits set; the network is {1}")]
    HostBits(String, IpPrefix),
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl IpPrefix {
    /// `addr/len` with the host bits cleared; `None` if `len` is too long
    /// for the family.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        (len <= max_len(addr)).then(|| Self {
            addr: mask(addr, len),
            len,
        })
    }

    /// The single address `addr` (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        Self {
            addr,
            len: max_len(addr),
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` is inside the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    /// Whether this is a single address.
    pub fn is_host(&self) -> bool {
        self.len == max_len(self.addr)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpPrefix {
    type Err = PrefixError;

    /// Parses `<address>/<length>`; host bits must be clear (a typo such as
    /// `10.0.1.5/24` is an error, not silently `10.0.1.0/24`).
    fn from_str(s: &str) -> Result<Self, PrefixError> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| PrefixError::NoSlash(s.to_owned()))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| PrefixError::Address(s.to_owned(), a.to_owned()))?;
        let max = max_len(addr);
        let len = l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| PrefixError::Length(s.to_owned(), l.to_owned(), max))?;
        let p = Self {
            addr: mask(addr, len),
            len,
        };
        if p.addr != addr {
            return Err(PrefixError::HostBits(s.to_owned(), p));
        }
        Ok(p)
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_kubernetes_writes_and_refuses_the_rest() {
        for (s, want) in [
            ("10.42.1.0/24", "10.42.1.0/24"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("10.1.2.3/32", "10.1.2.3/32"),
            ("fd00:42:1::/64", "fd00:42:1::/64"),
            ("::/0", "::/0"),
        ] {
            assert_eq!(s.parse::<IpPrefix>().unwrap().to_string(), want, "{s}");
        }
        for (s, needle) in [
            ("10.42.1.0", "want <address>/<length>"),
            ("10.42.1/24", "not an IP address"),
            ("10.42.1.0/33", "0..=32"),
            ("fd00::/129", "0..=128"),
            ("10.42.1.0/-1", "0..=32"),
            ("10.42.1.5/24", "host bits set; the network is 10.42.1.0/24"),
            ("fd00::1/64", "the network is fd00::/64"),
        ] {
            let e = s.parse::<IpPrefix>().unwrap_err().to_string();
            assert!(e.contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn contains_only_its_own_family_and_block() {
        let p: IpPrefix = "10.42.1.0/24".parse().unwrap();
        assert!(p.contains("10.42.1.255".parse().unwrap()));
        assert!(!p.contains("10.42.2.0".parse().unwrap()));
        assert!(!p.contains("::ffff:10.42.1.1".parse().unwrap()));
        let all: IpPrefix = "::/0".parse().unwrap();
        assert!(all.contains("fd00::1".parse().unwrap()));
        assert!(!all.contains("10.0.0.1".parse().unwrap()));
        let h = IpPrefix::host("fd00::5".parse().unwrap());
        assert!(h.is_host() && h.prefix_len() == 128);
        assert_eq!(
            IpPrefix::new("10.1.2.3".parse().unwrap(), 8)
                .unwrap()
                .to_string(),
            "10.0.0.0/8"
        );
        assert!(IpPrefix::new("10.1.2.3".parse().unwrap(), 33).is_none());
    }

    #[test]
    fn serde_round_trips_as_a_string() {
        let p: IpPrefix = "fd00:42:1::/64".parse().unwrap();
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(j, "\"fd00:42:1::/64\"");
        assert_eq!(serde_json::from_str::<IpPrefix>(&j).unwrap(), p);
        assert!(serde_json::from_str::<IpPrefix>("\"10.0.0.1/8\"").is_err());
    }
}
