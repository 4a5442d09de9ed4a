//! What the two-node external tests (external.rs, external6.rs) share:
//! the two ways each test runs the agents.
use crate::{agent::Agent, netns::Lan};

/// Which external program the agents run, and on what LAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Default flags, on a plain bridge (kind's topology): tc.
    Default,
    /// `--external-datapath xdp`, on a LAN that carries XDP_TX frames.
    ForcedXdp,
}

impl Mode {
    /// The program the agents attach to eth0.
    pub fn program(self) -> &'static str {
        match self {
            Mode::Default => "tc_from_wire",
            Mode::ForcedXdp => "xdp_from_wire",
        }
    }

    pub fn lan(self) -> Lan {
        match self {
            Mode::Default => Lan::PlainBridge,
            Mode::ForcedXdp => Lan::XdpCapable,
        }
    }

    /// The agent's flags beyond the defaults in this mode.
    pub fn agent_flags(self) -> &'static [&'static str] {
        match self {
            Mode::Default => &[],
            // Not the default: XDP is for NICs that run it natively.
            Mode::ForcedXdp => &["--external-datapath", "xdp"],
        }
    }
}

/// The programs an agent's `lb stats` lists for eth0.
pub fn eth0_programs(agent: &Agent) -> Vec<String> {
    let stats: serde_json::Value = serde_json::from_str(&agent.cli("stats", &["-o", "json"]).unwrap()).unwrap();
    let attachments = stats["attachments"].as_array().unwrap().iter();
    attachments.filter(|a| a["interface"] == "eth0").map(|a| a["program"].as_str().unwrap().to_owned()).collect()
}

/// Each named test function (taking a `Mode`), as one test per mode:
/// `default_flags_on_a_plain_bridge::NAME` and `forced_xdp::NAME`.
#[macro_export]
macro_rules! in_both_modes {
    ($($test:ident),* $(,)?) => {
        mod default_flags_on_a_plain_bridge {
            $(#[test]
            fn $test() {
                super::$test($crate::external::Mode::Default)
            })*
        }
        mod forced_xdp {
            $(#[test]
            fn $test() {
                super::$test($crate::external::Mode::ForcedXdp)
            })*
        }
    };
}
