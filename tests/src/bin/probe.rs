//! A host-network client for the tests: one TCP or UDP exchange with ADDR,
//! printing the answering pod and the peer address the socket API reports
//! (getpeername, or recvfrom's source), as `answer=NAME peer=ADDR`.
//!
//! probe tcp|udp|udp-connected ADDR
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, addr] = args.as_slice() else {
        eprintln!("usage: probe tcp|udp|udp-connected ADDR");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is IP:PORT");
    match exchange(mode, addr) {
        Ok((answer, peer)) => println!("answer={answer} peer={peer}"),
        Err(e) => {
            eprintln!("probe {mode} {addr}: {e}");
            std::process::exit(1);
        }
    }
}

fn exchange(mode: &str, addr: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let mut buf = [0u8; 256];
    match mode {
        "tcp" => {
            let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            writeln!(stream, "ping")?;
            let mut line = String::new();
            BufReader::new(stream.try_clone()?).read_line(&mut line)?;
            let answer = line.split_whitespace().next().unwrap_or_default().to_owned();
            Ok((answer, stream.peer_addr()?))
        }
        "udp" => {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            socket.send_to(b"ping", addr)?;
            let (n, from) = socket.recv_from(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
        }
        "udp-connected" => {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            socket.connect(addr)?;
            socket.send(b"ping")?;
            let n = socket.recv(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), socket.peer_addr()?))
        }
        other => Err(std::io::Error::other(format!("unknown mode {other}"))),
    }
}
