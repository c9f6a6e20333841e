//! A UDP relay that can cut a link: it forwards datagrams between one dialing node and a target
//! address, and drops everything both ways while cut. QUIC runs over UDP, so this is a real
//! network partition for the connections routed through it. The demo and the tests use it;
//! a node never does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Largest datagram relayed.
const DATAGRAM_BYTES_MAX: usize = 65_536;

pub struct Relay {
    /// Where to dial instead of the target.
    pub address: SocketAddr,
    cut: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Starts a relay to `target` on a free loopback port.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let front = UdpSocket::bind("127.0.0.1:0").await?;
        let back = UdpSocket::bind("127.0.0.1:0").await?;
        let address = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut up = vec![0u8; DATAGRAM_BYTES_MAX];
            let mut down = vec![0u8; DATAGRAM_BYTES_MAX];
            loop {
                tokio::select! {
                    received = front.recv_from(&mut up) => {
                        let Ok((len, from)) = received else { return };
                        client = Some(from);
                        if !flag.load(Ordering::Relaxed) {
                            let _ = back.send_to(&up[..len], target).await;
                        }
                    }
                    received = back.recv_from(&mut down) => {
                        let Ok((len, _)) = received else { return };
                        if let (Some(client), false) = (client, flag.load(Ordering::Relaxed)) {
                            let _ = front.send_to(&down[..len], client).await;
                        }
                    }
                }
            }
        });
        Ok(Self { address, cut, task })
    }

    /// Cuts (`true`) or restores (`false`) the link.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
