//! The simulated network: timers and deliveries on simulated time, links with latency,
//! bandwidth, small send queues, drops and duplicates, and the partitions that cut them.

use super::*;

/// A connection with a link cut one way is given up after this long (QUIC's idle timeout).
pub(crate) const ONE_WAY_TIMEOUT_MS: u64 = 3_000;

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Link {
    /// Connection id while connected; messages of older connections are dropped.
    pub(crate) connection: Option<u64>,
    pub(crate) cut_forward: bool,
    pub(crate) cut_backward: bool,
    pub(crate) one_way_since: Option<u64>,
    pub(crate) reconnect_at: u64,
    pub(crate) bandwidth_bytes_per_ms: u64,
    /// When each direction (smaller to larger index, then back) finishes sending what it has.
    pub(crate) busy_until: [u64; 2],
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Happening {
    /// A frame arrives.
    Deliver {
        from: usize,
        to: usize,
        connection: u64,
        frame: Vec<u8>,
    },
    /// A frame left `node`'s queue to `peer`: its room is free again.
    Drained {
        node: usize,
        peer: usize,
        connection: u64,
        bytes: usize,
    },
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct InFlight {
    pub(crate) at: u64,
    pub(crate) order: u64,
    pub(crate) happening: Happening,
}

impl Sim {
    pub(super) fn schedule(&mut self, at: u64, happening: Happening) {
        self.next_order += 1;
        self.in_flight.push(Reverse(InFlight {
            at,
            order: self.next_order,
            happening,
        }));
    }

    /// Puts a frame on the wire: it leaves the sender's queue once the link has sent it at
    /// its bandwidth, and arrives a latency later, unless a fault takes it.
    pub(super) fn send(&mut self, from: usize, to: usize, connection: u64, frame: Vec<u8>) {
        let key = (from.min(to), from.max(to));
        let link = self.links[&key];
        if link.connection != Some(connection) {
            return;
        }
        self.summary.messages += 1;
        self.summary.bytes += frame.len() as u64;
        let forward = from < to;
        let direction = usize::from(!forward);
        let start = link.busy_until[direction].max(self.now_ms);
        if start > self.now_ms {
            self.summary.queue_full_waits += 1;
        }
        let sent_at = start + (frame.len() as u64).div_ceil(link.bandwidth_bytes_per_ms);
        if let Some(link) = self.links.get_mut(&key) {
            link.busy_until[direction] = sent_at;
        }
        self.schedule(
            sent_at,
            Happening::Drained {
                node: from,
                peer: to,
                connection,
                bytes: frame.len(),
            },
        );
        let cut = if forward {
            link.cut_forward
        } else {
            link.cut_backward
        };
        if cut {
            return;
        }
        if self.faults_on && self.rng.chance(self.params.drop_percent) {
            self.fault("message dropped");
            return;
        }
        let copies = if self.faults_on && self.rng.chance(self.params.duplicate_percent) {
            self.fault("message duplicated");
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.params.latency_ms + self.rng.below(self.params.jitter_ms + 1);
            self.schedule(
                sent_at + delay,
                Happening::Deliver {
                    from,
                    to,
                    connection,
                    frame: frame.clone(),
                },
            );
        }
    }

    /// Moves simulated time forward by `ms`, delivering messages and firing timers on the way.
    pub(super) fn advance(&mut self, ms: u64) -> Result<(), Violation> {
        let until = self.now_ms + ms;
        loop {
            let next_message = self.in_flight.peek().map(|Reverse(message)| message.at);
            let next_timer = self.next_timer();
            let next = [next_message, next_timer].into_iter().flatten().min();
            match next {
                Some(at) if at <= until => {
                    self.now_ms = self.now_ms.max(at);
                    if next_message == Some(at) {
                        let Reverse(message) = self.in_flight.pop().expect("peeked");
                        self.happen(message.happening)?;
                    } else {
                        self.fire_timers()?;
                    }
                }
                _ => break,
            }
        }
        self.now_ms = until;
        self.maintain_links()?;
        Ok(())
    }

    pub(super) fn next_timer(&self) -> Option<u64> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.up)
            .filter_map(|(index, node)| {
                let due = node.driver.poll_timeout()?;
                let local_now = self.node_now(index).as_millis() as u64;
                Some(self.now_ms + due.as_millis().saturating_sub(u128::from(local_now)) as u64)
            })
            .min()
    }

    pub(super) fn fire_timers(&mut self) -> Result<(), Violation> {
        for index in 0..self.nodes.len() {
            if !self.nodes[index].up {
                continue;
            }
            let due = self.nodes[index].driver.poll_timeout();
            if due.is_some_and(|due| due <= self.node_now(index)) {
                self.step(index, vec![Input::Timeout])?;
            }
        }
        Ok(())
    }

    pub(super) fn happen(&mut self, happening: Happening) -> Result<(), Violation> {
        match happening {
            Happening::Deliver {
                from,
                to,
                connection,
                frame,
            } => self.deliver(from, to, connection, frame),
            Happening::Drained {
                node,
                peer,
                connection,
                bytes,
            } => {
                if !self.nodes[node].up {
                    return Ok(());
                }
                let peer = self.nodes[peer].id;
                self.step(
                    node,
                    vec![Input::Drained {
                        peer,
                        connection,
                        bytes,
                    }],
                )
            }
        }
    }

    pub(super) fn deliver(
        &mut self,
        from: usize,
        to: usize,
        connection: u64,
        frame: Vec<u8>,
    ) -> Result<(), Violation> {
        let key = (from.min(to), from.max(to));
        if self.links[&key].connection != Some(connection) || !self.nodes[to].up {
            return Ok(());
        }
        let mut decoder = concord_proto::FrameDecoder::new();
        let decoded = decoder.push(&frame).and_then(|()| decoder.next_message());
        let Ok(Some(message)) = decoded else {
            return Err(self.violation("a frame the engine produced does not decode".to_owned()));
        };
        let peer = self.nodes[from].id;
        self.step(
            to,
            vec![Input::Received {
                peer,
                connection,
                message,
            }],
        )
    }

    /// Connects links that can be connected, gives up one-way links, restarts crashed nodes,
    /// and opens and closes edge offices' windows.
    pub(super) fn maintain_links(&mut self) -> Result<(), Violation> {
        for index in 0..self.nodes.len() {
            if let Some(at) = self.nodes[index].restart_at {
                if at <= self.now_ms && !self.nodes[index].up {
                    self.restart(index)?;
                }
            }
        }
        let keys: Vec<(usize, usize)> = self.links.keys().copied().collect();
        for key in keys {
            let (a, b) = key;
            let link = self.links[&key];
            let edge_offline = self.faults_on
                && (self.nodes[a].edge || self.nodes[b].edge)
                && (self.now_ms / 1000) % 20 >= 2;
            let usable = self.nodes[a].up
                && self.nodes[b].up
                && !(link.cut_forward && link.cut_backward)
                && !edge_offline;
            match link.connection {
                Some(_) if !usable => self.disconnect(a, b)?,
                Some(_)
                    if link
                        .one_way_since
                        .is_some_and(|since| self.now_ms - since >= ONE_WAY_TIMEOUT_MS) =>
                {
                    self.fault("connection lost to a one-way cut");
                    self.disconnect(a, b)?;
                }
                None if usable
                    && !link.cut_forward
                    && !link.cut_backward
                    && self.now_ms >= link.reconnect_at =>
                {
                    self.connect(a, b)?
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub(super) fn connect(&mut self, a: usize, b: usize) -> Result<(), Violation> {
        let connection = self.next_connection;
        self.next_connection += 1;
        if let Some(link) = self.links.get_mut(&(a, b)) {
            link.connection = Some(connection);
        }
        self.record_trace(format!("{} connect {a} {b}", self.now_ms));
        let (id_a, id_b) = (self.nodes[a].id, self.nodes[b].id);
        self.step(
            a,
            vec![Input::Up {
                peer: id_b,
                connection,
            }],
        )?;
        self.step(
            b,
            vec![Input::Up {
                peer: id_a,
                connection,
            }],
        )
    }

    pub(super) fn disconnect(&mut self, a: usize, b: usize) -> Result<(), Violation> {
        let reconnect_in = 100 + self.rng.below(2000);
        let Some(link) = self.links.get_mut(&(a, b)) else {
            return Ok(());
        };
        let Some(connection) = link.connection.take() else {
            return Ok(());
        };
        link.one_way_since = None;
        link.reconnect_at = self.now_ms + reconnect_in;
        self.record_trace(format!("{} disconnect {a} {b}", self.now_ms));
        let (id_a, id_b) = (self.nodes[a].id, self.nodes[b].id);
        if self.nodes[a].up {
            self.step(
                a,
                vec![Input::Down {
                    peer: id_b,
                    connection,
                }],
            )?;
        }
        if self.nodes[b].up {
            self.step(
                b,
                vec![Input::Down {
                    peer: id_a,
                    connection,
                }],
            )?;
        }
        Ok(())
    }

    pub(super) fn partition_fault(&mut self) {
        let keys: Vec<(usize, usize)> = self.links.keys().copied().collect();
        match self.rng.below(4) {
            0 => {
                // Symmetric: a random group is cut off from the rest.
                let group: BTreeSet<usize> = (0..self.nodes.len())
                    .filter(|_| self.rng.chance(40))
                    .collect();
                for (a, b) in &keys {
                    if group.contains(a) != group.contains(b) {
                        let link = self.links.get_mut(&(*a, *b)).expect("link");
                        link.cut_forward = true;
                        link.cut_backward = true;
                    }
                }
                self.fault("symmetric partition");
                self.record_trace(format!("{} partition {group:?}", self.now_ms));
            }
            1 => {
                // One way: one link drops one direction only.
                let key = keys[self.rng.index(keys.len())];
                let forward = self.rng.chance(50);
                let now = self.now_ms;
                let link = self.links.get_mut(&key).expect("link");
                if forward {
                    link.cut_forward = true;
                } else {
                    link.cut_backward = true;
                }
                link.one_way_since = Some(now);
                self.fault("one-way cut");
                self.record_trace(format!(
                    "{} one-way cut {key:?} forward={forward}",
                    self.now_ms
                ));
            }
            2 => {
                // Links cut one by one (one more per fault), restored later in random order.
                let key = keys[self.rng.index(keys.len())];
                let link = self.links.get_mut(&key).expect("link");
                link.cut_forward = true;
                link.cut_backward = true;
                self.fault("link cut");
                self.record_trace(format!("{} cut {key:?}", self.now_ms));
            }
            _ => {
                // Restore a random cut link: restorations come in random order.
                let cut: Vec<(usize, usize)> = keys
                    .iter()
                    .copied()
                    .filter(|key| {
                        let link = self.links[key];
                        link.cut_forward || link.cut_backward
                    })
                    .collect();
                if !cut.is_empty() {
                    let key = cut[self.rng.index(cut.len())];
                    let link = self.links.get_mut(&key).expect("link");
                    link.cut_forward = false;
                    link.cut_backward = false;
                    link.one_way_since = None;
                    self.fault("link restored");
                    self.record_trace(format!("{} restore {key:?}", self.now_ms));
                }
            }
        }
    }
}
