//! A TCP proxy that delays everything it forwards by a fixed time in each
//! direction, for benchmarks of a database on another host (a round trip
//! costs twice the delay more; throughput is not limited):
//!
//! `cargo run --release --example latency_proxy -- LISTEN UPSTREAM DELAY_US`
//!
//! e.g. `… 127.0.0.1:15432 127.0.0.1:5432 250` puts PostgreSQL 0.5 ms of
//! round trip away. Blocking threads (four per connection) keep the delay
//! precise to tens of microseconds, which an async timer would round up to
//! a millisecond.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, delay_us] = args.as_slice() else {
        eprintln!("usage: latency_proxy LISTEN UPSTREAM DELAY_US");
        std::process::exit(2);
    };
    let delay = Duration::from_micros(delay_us.parse().expect("DELAY_US: microseconds"));
    let listener = TcpListener::bind(listen).expect("cannot listen");
    eprintln!("latency_proxy: {listen} -> {upstream}, +{delay:?} each way");
    for client in listener.incoming().flatten() {
        let Ok(server) = TcpStream::connect(upstream) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        for (from, to) in [(&client, &server), (&server, &client)] {
            let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
            forward(from, to, delay);
        }
    }
}

/// Reads `from` and writes each chunk to `to` once `delay` has passed since
/// it was read.
fn forward(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
}
