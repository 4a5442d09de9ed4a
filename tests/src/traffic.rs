//! Traffic kept up while something is done to the agent or the cluster:
//! one connection that stays open (and must stay on its backend) and a
//! worker opening a new connection every few milliseconds. Every failure
//! is kept, so a test can say "no request failed" and show the first ones.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    netns::Netns,
    pods::{Session, tcp_ask},
};

pub struct Traffic {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    workers: Vec<JoinHandle<()>>,
}

/// What the traffic saw.
#[derive(Debug)]
pub struct Tally {
    pub answered: u64,
    pub failures: Vec<String>,
}

impl Tally {
    /// Panics unless every request was answered, and at least `at_least`.
    pub fn assert_none_failed(&self, at_least: u64) {
        assert!(
            self.failures.is_empty(),
            "{} of {} requests failed: {:?}",
            self.failures.len(),
            self.answered + self.failures.len() as u64,
            &self.failures[..self.failures.len().min(5)]
        );
        assert!(self.answered >= at_least, "only {} requests answered", self.answered);
    }
}

impl Traffic {
    /// Starts the open connection and the new-connection worker from
    /// `client` to `service`; the open connection's first answer names
    /// its backend, which every later answer must name too.
    pub fn start(client: &Netns, service: impl Into<SocketAddr>) -> anyhow::Result<Self> {
        let service: SocketAddr = service.into();
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut session = client.enter(|| Session::connect(service))?;
        let backend = session.ask("first")?;
        let mut session = Some(session);
        let workers = (0..2)
            .map(|worker| {
                let (stop, answered, failures) = (stop.clone(), answered.clone(), failures.clone());
                let (mut session, backend) = (if worker == 0 { session.take() } else { None }, backend.clone());
                client.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let result = match &mut session {
                            Some(s) => s.ask("again").and_then(|b| {
                                if b == backend { Ok(b) } else { Err(std::io::Error::other(format!("moved to {b}"))) }
                            }),
                            None => tcp_ask(service),
                        };
                        match result {
                            Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                let what = if session.is_some() { "open connection" } else { "new connection" };
                                failures
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .push(format!("{what}: {e}"));
                                0
                            }
                        };
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        Ok(Self { stop, answered, failures, workers })
    }

    /// Stops the traffic and says what it saw.
    pub fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            let _ = worker.join();
        }
        let failures = std::mem::take(&mut *self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        Tally { answered: self.answered.load(Ordering::Relaxed), failures }
    }
}
