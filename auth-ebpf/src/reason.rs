//! Verdict reasons: the one table mapping code → text, shared by metrics,
//! `meshauth observe` and logs. The codes mirror `bpf/lib/drop.h`; drop codes
//! are Hubble's, so runbooks that filter on them keep working.

/// Passed: no auth-required policy between the two identities.
pub const PASS_NO_POLICY: u8 = 1;
/// Passed: auth required and a live auth entry exists.
pub const PASS_AUTHENTICATED: u8 = 2;
/// Passed: a reply of a tracked flow.
pub const PASS_REPLY: u8 = 3;
/// Passed in audit mode; enforce mode would have dropped it (189).
pub const PASS_AUDIT: u8 = 4;
/// Passed: the local end is a reserved identity, not enforced.
pub const PASS_NOT_ENFORCED: u8 = 5;
/// Event: an auth-required signal was queued for the agent.
pub const EVENT_SIGNAL_SENT: u8 = 64;
/// Event: no signal, one for the same pair went out within the interval.
pub const EVENT_SIGNAL_RATE_LIMITED: u8 = 65;
/// Event: no signal, the ring buffer was full.
pub const EVENT_SIGNAL_LOST: u8 = 66;
/// Event: no flow event, one for the same flow went out within the
/// interval, or the CPU's per-second budget was spent.
pub const EVENT_FLOW_EVENT_SUPPRESSED: u8 = 67;
/// Dropped: headers could not be parsed.
pub const DROP_INVALID: u8 = 134;
/// Dropped: "Invalid source ip" — on egress, the source address is not one
/// of the sending pod's own addresses.
pub const DROP_INVALID_SOURCE_IP: u8 = 132;
/// Dropped: "Invalid IPv6 extension header" — the extension-header chain is
/// longer than the datapath walks.
pub const DROP_INVALID_EXTHDR: u8 = 156;
/// Dropped: "Policy denied" — strict mode, the pod's own address is not
/// known to meshauth yet.
pub const DROP_POLICY_DENIED: u8 = 133;
/// Dropped: "Authentication required".
pub const DROP_AUTH_REQUIRED: u8 = 189;

/// Every reason: (code, short label for metrics, Hubble-style description).
pub const REASONS: &[(u8, &str, &str)] = &[
    (PASS_NO_POLICY, "no_policy", "No authentication required"),
    (PASS_AUTHENTICATED, "authenticated", "Authenticated"),
    (PASS_REPLY, "reply", "Reply of a tracked flow"),
    (PASS_AUDIT, "audit", "Authentication required (audit mode)"),
    (
        PASS_NOT_ENFORCED,
        "not_enforced",
        "Reserved local identity, not enforced",
    ),
    (
        EVENT_SIGNAL_SENT,
        "signal_sent",
        "Auth-required signal sent",
    ),
    (
        EVENT_SIGNAL_RATE_LIMITED,
        "signal_rate_limited",
        "Auth-required signal rate-limited",
    ),
    (
        EVENT_SIGNAL_LOST,
        "signal_lost",
        "Auth-required signal lost (ring buffer full)",
    ),
    (
        EVENT_FLOW_EVENT_SUPPRESSED,
        "flow_event_suppressed",
        "Flow event rate-limited",
    ),
    (DROP_INVALID, "invalid", "Invalid packet"),
    (
        DROP_INVALID_SOURCE_IP,
        "invalid_source_ip",
        "Invalid source ip",
    ),
    (
        DROP_INVALID_EXTHDR,
        "invalid_exthdr",
        "Invalid IPv6 extension header",
    ),
    (
        DROP_POLICY_DENIED,
        "unknown_pod",
        "Policy denied (pod address not yet known to meshauth)",
    ),
    (
        DROP_AUTH_REQUIRED,
        "auth_required",
        "Authentication required",
    ),
];

/// Hubble's `DropReason` enum name (flow.proto) of a drop code, as Hubble's
/// JSON writes it in `drop_reason_desc`; `"DROP_REASON_UNKNOWN"` for a code
/// Hubble has no name for (and for passes, which carry no drop reason).
pub fn hubble_name(code: u8) -> &'static str {
    match code {
        DROP_INVALID_SOURCE_IP => "INVALID_SOURCE_IP",
        DROP_POLICY_DENIED => "POLICY_DENIED",
        DROP_INVALID => "INVALID_PACKET_DROPPED",
        DROP_INVALID_EXTHDR => "INVALID_IPV6_EXTENSION_HEADER",
        DROP_AUTH_REQUIRED => "AUTH_REQUIRED",
        _ => "DROP_REASON_UNKNOWN",
    }
}

/// True for event codes (counted in the metrics map, not verdicts).
pub fn is_event(code: u8) -> bool {
    (64..128).contains(&code)
}

/// True for drop codes (Hubble's numbering starts at 130).
pub fn is_drop(code: u8) -> bool {
    code >= 128
}

/// The metrics label of a code; `"unknown"` for a code not in [`REASONS`].
pub fn label(code: u8) -> &'static str {
    REASONS
        .iter()
        .find(|(c, _, _)| *c == code)
        .map_or("unknown", |(_, l, _)| l)
}

/// The human description of a code (Hubble's `drop_reason_desc` for drops).
pub fn description(code: u8) -> &'static str {
    REASONS
        .iter()
        .find(|(c, _, _)| *c == code)
        .map_or("Unknown reason", |(_, _, d)| d)
}
