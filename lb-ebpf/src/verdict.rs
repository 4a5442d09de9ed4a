//! What the packet pipeline decides: the type every packet hook, conntrack
//! and the rewrites share.
use lb_common::{Backend, Ipv4};

/// Where a packet entered the node.
#[derive(Clone, Copy)]
pub enum Origin {
    /// From a pod, whose replies come back through this node anyway.
    Pod,
    /// From an external interface (`ifindex`, the hook's `ctx`): a client
    /// that may be outside the cluster.
    Wire { ctx: *mut core::ffi::c_void, ifindex: u32 },
}

/// What a hook does with a packet.
pub enum Verdict<A = Ipv4> {
    /// Rewrite the destination to this backend; `new` for the first packet
    /// of a flow; `hairpin` when the backend is the client itself, and the
    /// source must become `HAIRPIN_ADDR`; `snat` when the backend is on
    /// another node and the source must become this node's address and
    /// port, after which the packet is sent on.
    Dnat { backend: Backend<A>, new: bool, hairpin: bool, snat: Option<(A, [u8; 2])> },
    /// The reply of an SNAT flow: rewrite the source to the service and the
    /// destination to the client, and send it back to the client.
    SnatReply { service: (A, [u8; 2]), client: (A, [u8; 2]) },
    /// New flow from a client outside the frontend's source ranges.
    SourceRangeDenied,
    /// For a traffic-policy-Local frontend without a local backend.
    NoLocalBackend,
    /// New external flow to a backend on another node that cannot be
    /// source-NATed (no route to it, or no free port).
    SnatFailed,
    /// Rewrite the source back to the service address and port.
    ReverseNat(A, [u8; 2]),
    /// Rewrite the source back to the service address and port, and the
    /// destination back to the client's own address.
    HairpinReply { service: (A, [u8; 2]), client: A },
    /// Not for a service.
    Pass,
    /// For a service without a ready backend: refuse the connection.
    NoBackend,
    /// For a service address on a port no Service defines.
    UnknownPort,
}
