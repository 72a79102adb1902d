//! The `#[repr(C)]` mirrors against the compiled object's BTF: every struct's
//! size and every member's offset. A small BTF reader of its own, so the
//! check does not trust the loader it checks.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};

use auth_ebpf::types::*;
use object::{Object as _, ObjectSection as _};

/// struct name → (size, member name → byte offset)
type Layouts = HashMap<String, (u32, HashMap<String, u32>)>;

fn btf_structs() -> Layouts {
    let file = object::File::parse(auth_ebpf::OBJECT).expect("parse ELF");
    let btf = file
        .section_by_name(".BTF")
        .expect("object has .BTF")
        .data()
        .expect(".BTF data");
    let u16_at = |o: usize| u16::from_le_bytes([btf[o], btf[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(btf[o..o + 4].try_into().unwrap());
    assert_eq!(u16_at(0), 0xeb9f, "BTF magic");
    let hdr_len = u32_at(4) as usize;
    let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
    let str_off = u32_at(16) as usize;
    let types = hdr_len + type_off;
    let strs = hdr_len + str_off;
    let name = |off: u32| -> String {
        let start = strs + off as usize;
        let end = btf[start..].iter().position(|&b| b == 0).unwrap() + start;
        String::from_utf8_lossy(&btf[start..end]).into_owned()
    };

    let mut out = Layouts::new();
    let mut p = types;
    while p < types + type_len {
        let name_off = u32_at(p);
        let info = u32_at(p + 4);
        let size = u32_at(p + 8);
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kind_flag = info >> 31 == 1;
        p += 12;
        let extra = match kind {
            1 => 4,             // INT
            3 => 12,            // ARRAY
            4 | 5 => 12 * vlen, // STRUCT, UNION
            6 => 8 * vlen,      // ENUM
            13 => 8 * vlen,     // FUNC_PROTO
            14 => 4,            // VAR
            15 => 12 * vlen,    // DATASEC
            17 => 4,            // DECL_TAG
            19 => 12 * vlen,    // ENUM64
            _ => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        };
        if kind == 4 && name_off != 0 {
            let mut members = HashMap::new();
            for i in 0..vlen {
                let m = p + 12 * i;
                let off = u32_at(m + 8);
                let bits = if kind_flag { off & 0x00ff_ffff } else { off };
                members.insert(name(u32_at(m)), bits / 8);
            }
            out.insert(name(name_off), (size, members));
        }
        p += extra;
    }
    out
}

macro_rules! check {
    ($layouts:expr, $c:literal, $t:ty, [$($f:ident),+ $(,)?]) => {{
        let (size, members) = $layouts
            .get($c)
            .unwrap_or_else(|| panic!("struct {} not in the object's BTF", $c));
        assert_eq!(*size as usize, size_of::<$t>(), "size of struct {} vs {}", $c, stringify!($t));
        let mut n = 0;
        $(
            n += 1;
            assert_eq!(
                members.get(stringify!($f)).copied().unwrap_or_else(|| panic!("{}.{} not in BTF", $c, stringify!($f))) as usize,
                offset_of!($t, $f),
                "offset of {}.{}", $c, stringify!($f)
            );
        )+
        assert_eq!(members.len(), n, "struct {} has members {:?} the Rust type does not mirror", $c, members.keys());
    }};
}

#[test]
fn rust_types_match_the_objects_btf() {
    let l = btf_structs();
    check!(l, "ipcache_value", IpcacheValue, [identity, node_id, flags]);
    check!(
        l,
        "policy_key",
        PolicyKey,
        [local_id, remote_id, port, proto, direction]
    );
    check!(l, "policy_value", PolicyValue, [auth_type, flags, pad]);
    check!(
        l,
        "auth_key",
        AuthKey,
        [local_id, remote_id, remote_node_id, auth_type, pad]
    );
    check!(l, "auth_value", AuthValue, [expiry]);
    check!(
        l,
        "ct_key",
        CtKey,
        [
            cgroup, saddr, daddr, sport, dport, proto, family, direction, pad
        ]
    );
    check!(l, "ct_value", CtValue, [last_seen, flags, pad]);
    check!(l, "signal_msg", SignalMsg, [key, ts]);
    check!(
        l,
        "flow_event",
        FlowEventRaw,
        [
            ts,
            local,
            remote,
            local_id,
            remote_id,
            local_port,
            remote_port,
            remote_node_id,
            proto,
            family,
            direction,
            reason,
            verdict,
            auth_type,
            len,
            pad,
        ]
    );
    check!(l, "metrics_value", MetricsValue, [packets, bytes]);
    check!(
        l,
        "config_value",
        ConfigValue,
        [
            mode,
            event_mask,
            signal_interval_ns,
            generation,
            flags,
            event_interval_ns,
            event_budget,
            pad,
            suspended_ns
        ]
    );
    check!(l, "endpoint_key", EndpointKey, [cgroup, family, pad, addr]);
    check!(l, "endpoint_value", EndpointValue, [identity, flags]);
    check!(
        l,
        "event_limit_key",
        EventLimitKey,
        [local, remote, port, proto, family, direction, reason, pad]
    );
    check!(l, "event_budget", EventBudget, [window_start, count]);
    check!(l, "layout_value", LayoutValue, [version, pad]);
    // The per-socket cache lives only in the kernel; check its shape is what
    // skcache.h intends (two 64-byte slots, the times 8-aligned).
    let (slot, m) = l.get("sk_verdict_slot").expect("sk_verdict_slot in BTF");
    assert_eq!(*slot, 64);
    assert_eq!((m["expiry"], m["deadline_coarse"]), (48, 56));
    assert_eq!(l.get("sk_verdict").expect("sk_verdict in BTF").0, 128);

    // The ipcache key: the LPM prefix length, then the data aya's Key wraps.
    let (size, m) = l.get("ipcache_key").expect("ipcache_key");
    assert_eq!(*size as usize, 4 + size_of::<IpcacheKeyData>());
    assert_eq!(m["family"] as usize, 4 + offset_of!(IpcacheKeyData, family));
    assert_eq!(m["addr"] as usize, 4 + offset_of!(IpcacheKeyData, addr));
}

#[test]
fn reason_codes_match_drop_h() {
    let src = include_str!("../bpf/lib/drop.h");
    let defined: HashMap<&str, u8> = src
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("#define ")?.split_whitespace();
            Some((w.next()?, w.next()?.parse().ok()?))
        })
        .collect();
    use auth_ebpf::reason::*;
    for (name, code) in [
        ("REASON_PASS_NO_POLICY", PASS_NO_POLICY),
        ("REASON_PASS_AUTHENTICATED", PASS_AUTHENTICATED),
        ("REASON_PASS_REPLY", PASS_REPLY),
        ("REASON_PASS_AUDIT", PASS_AUDIT),
        ("REASON_PASS_NOT_ENFORCED", PASS_NOT_ENFORCED),
        ("EVENT_SIGNAL_SENT", EVENT_SIGNAL_SENT),
        ("EVENT_SIGNAL_RATE_LIMITED", EVENT_SIGNAL_RATE_LIMITED),
        ("EVENT_SIGNAL_LOST", EVENT_SIGNAL_LOST),
        ("EVENT_FLOW_EVENT_SUPPRESSED", EVENT_FLOW_EVENT_SUPPRESSED),
        ("DROP_INVALID", DROP_INVALID),
        ("DROP_INVALID_SOURCE_IP", DROP_INVALID_SOURCE_IP),
        ("DROP_INVALID_EXTHDR", DROP_INVALID_EXTHDR),
        ("DROP_POLICY_DENIED", DROP_POLICY_DENIED),
        ("DROP_AUTH_REQUIRED", DROP_AUTH_REQUIRED),
    ] {
        assert_eq!(defined.get(name), Some(&code), "{name}");
        assert_ne!(label(code), "unknown", "{name} has no row in REASONS");
    }
    assert_eq!(
        defined.len(),
        REASONS.len(),
        "drop.h and REASONS list the same codes"
    );
    assert_eq!(description(189), "Authentication required");
}
