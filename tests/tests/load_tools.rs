//! The benchmarks' load tools, run for a moment each against their server
//! in a namespace of the test's own, so that they keep working. Needs root.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Command},
    time::Duration,
};

use lb_tests::{
    agent::lb_binary,
    load::{Mode, Report},
    netns::{Netns, unique_tag},
};

/// The server, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn load_binary() -> std::path::PathBuf {
    lb_binary().with_file_name("lb-load")
}

#[test]
fn each_load_tool_reports_transactions_rate_and_ordered_percentiles() {
    let netns = Netns::new(format!("lbt{}-load", unique_tag())).unwrap();
    netns.ip(&["link", "set", "lo", "up"]).unwrap();
    let ns = format!("--net={}", netns.path().display());
    let _server = Server(Command::new("nsenter").args([ns.as_str()]).arg(load_binary()).arg("serve").spawn().unwrap());
    let target = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080);
    std::thread::sleep(Duration::from_millis(200));
    for (mode, name) in [(Mode::Crr, "crr"), (Mode::Rr, "rr"), (Mode::UdpRr, "udp-rr")] {
        let out = Command::new("nsenter")
            .arg(&ns)
            .arg(load_binary())
            .args([name, "--target", &target.to_string(), "--seconds", "0.3", "--concurrency", "2"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let report: Report = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report.mode, mode);
        assert!(report.transactions > 100, "{name}: {report:?}");
        assert_eq!(report.errors, 0, "{name}: {report:?}");
        assert!((report.rate - report.transactions as f64 / report.seconds).abs() < 1.0, "{name}: {report:?}");
        assert!(0.0 < report.p50_us && report.p50_us <= report.p90_us && report.p90_us <= report.p99_us, "{report:?}");
    }
}
