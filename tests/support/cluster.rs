//! A real Redis Cluster on loopback: `masters` redis-server processes with
//! `--cluster-enabled yes`, each with `replicas` replicas, joined by
//! `redis-cli --cluster create`. Nodes are killed when the cluster is
//! dropped; a test may kill one earlier to force a failover.
//!
//! Every node runs with a short `cluster-node-timeout`, so a killed master
//! is failed over by its replica within a few seconds.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long creating the cluster may take before the test gives up.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// `cluster-node-timeout`: how long a silent master has until it is failed over.
pub const NODE_TIMEOUT_MS: u64 = 1000;

struct Node {
    port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

/// A running Redis Cluster; see the module documentation.
pub struct RedisCluster {
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts `masters * (1 + replicas)` nodes and forms the cluster; waits
    /// until every node reports `cluster_state:ok` and every replica is in
    /// sync with its master.
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        RedisCluster::start_with_node_timeout(masters, replicas, NODE_TIMEOUT_MS)
    }

    /// Like `start`, with `cluster-node-timeout` set to `node_timeout_ms`:
    /// no failover can begin before a master has been silent that long.
    pub fn start_with_node_timeout(
        masters: usize,
        replicas: usize,
        node_timeout_ms: u64,
    ) -> RedisCluster {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match RedisCluster::try_start(masters, replicas, node_timeout_ms) {
                Ok(cluster) => return cluster,
                // Most likely a port taken between our probe and the bind.
                Err(e) => failures.push(e),
            }
        }
        panic!("could not start a Redis Cluster: {}", failures.join("; "));
    }

    fn try_start(
        masters: usize,
        replicas: usize,
        node_timeout_ms: u64,
    ) -> Result<RedisCluster, String> {
        let mut cluster = RedisCluster { nodes: Vec::new() };
        for _ in 0..masters * (1 + replicas) {
            let port = cluster_port();
            let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", &node_timeout_ms.to_string()])
                .args(["--cluster-replica-validity-factor", "0"])
                .args(["--cluster-announce-ip", "127.0.0.1"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("spawn redis-server: {e}"))?;
            cluster.nodes.push(Node {
                port,
                child: Some(child),
                _dir: dir,
            });
        }
        let deadline = Instant::now() + READY_WITHIN;
        for i in 0..cluster.nodes.len() {
            cluster.wait_for(deadline, |c| {
                c.cli(i, &["PING"]).is_ok_and(|r| r.trim() == "PONG")
            })?;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("redis-cli --cluster create: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        cluster.wait_healthy(deadline)?;
        Ok(cluster)
    }

    /// `redis://127.0.0.1:<port>/` of every node, the killed ones included
    /// (a client is configured with all of them).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }

    /// The index of the live master serving the hash slot of `key`.
    pub fn master_of(&self, key: &str) -> Option<usize> {
        let any = self.live().next()?;
        let slot: u16 = self
            .cli(any, &["CLUSTER", "KEYSLOT", key])
            .ok()?
            .trim()
            .parse()
            .ok()?;
        self.masters()
            .into_iter()
            .find(|(_, ranges)| ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&slot)))
            .map(|(i, _)| i)
    }

    /// Live masters with the slot ranges they serve, from `CLUSTER NODES`
    /// as seen by a live node.
    pub fn masters(&self) -> Vec<(usize, Vec<(u16, u16)>)> {
        let Some(any) = self.live().next() else {
            return Vec::new();
        };
        let Ok(nodes) = self.cli(any, &["CLUSTER", "NODES"]) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let Some(port) = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            let Some(i) = self.nodes.iter().position(|n| n.port == port) else {
                continue;
            };
            let ranges = fields[8..]
                .iter()
                .filter_map(|r| match r.split_once('-') {
                    Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
                    None => r.parse().ok().map(|s| (s, s)),
                })
                .collect::<Vec<(u16, u16)>>();
            if !ranges.is_empty() {
                out.push((i, ranges));
            }
        }
        out
    }

    /// Kills node `i` (SIGKILL: no goodbye to the cluster).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Polls until every live node reports `cluster_state:ok`, all 16384
    /// slots are served by live masters, and every live replica's link to
    /// its master is up.
    pub fn wait_healthy(&self, deadline: Instant) -> Result<(), String> {
        self.wait_for(deadline, RedisCluster::healthy)
    }

    fn healthy(&self) -> bool {
        let live: Vec<usize> = self.live().collect();
        let ok = live.iter().all(|&i| {
            self.cli(i, &["CLUSTER", "INFO"])
                .is_ok_and(|info| info.contains("cluster_state:ok"))
        });
        let served: u32 = self
            .masters()
            .iter()
            .flat_map(|(_, ranges)| ranges.iter().map(|(lo, hi)| u32::from(hi - lo) + 1))
            .sum();
        let synced = live.iter().all(|&i| {
            self.cli(i, &["INFO", "replication"]).is_ok_and(|info| {
                !info.contains("role:slave") || info.contains("master_link_status:up")
            })
        });
        ok && served == 16384 && synced
    }

    /// Polls until every live master's replicas have acknowledged all of its
    /// writes (replication offsets equal), so a failover loses nothing.
    pub fn wait_replicated(&self, deadline: Instant) -> Result<(), String> {
        self.wait_for(deadline, |c| {
            c.masters().iter().all(|(i, _)| {
                let info = c.cli(*i, &["INFO", "replication"]).unwrap_or_default();
                let offset = info
                    .lines()
                    .find_map(|l| l.strip_prefix("master_repl_offset:"))
                    .map(str::trim);
                let replicas: Vec<&str> = info
                    .lines()
                    .filter(|l| l.starts_with("slave") && l.contains("offset="))
                    .collect();
                !replicas.is_empty()
                    && replicas.iter().all(|l| {
                        l.split(',')
                            .find_map(|kv| kv.strip_prefix("offset="))
                            .map(str::trim)
                            == offset
                    })
            })
        })
    }

    /// `used_memory` (bytes) summed over the live masters.
    pub fn used_memory(&self) -> u64 {
        self.masters()
            .iter()
            .map(|(i, _)| used_memory(&self.cli(*i, &["INFO", "memory"]).unwrap_or_default()))
            .sum()
    }

    /// Keys (`DBSIZE`) summed over the live masters.
    pub fn keys(&self) -> u64 {
        self.masters()
            .iter()
            .filter_map(|(i, _)| self.cli(*i, &["DBSIZE"]).ok()?.trim().parse::<u64>().ok())
            .sum()
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.child.is_some())
            .map(|(i, _)| i)
    }

    fn wait_for(&self, deadline: Instant, ready: impl Fn(&Self) -> bool) -> Result<(), String> {
        loop {
            if ready(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("Redis Cluster not ready in time".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `redis-cli` against node `i` and returns its output.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.nodes[i].port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("redis-cli: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// `used_memory:` from an `INFO memory` reply.
pub fn used_memory(info: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A free loopback port whose cluster bus port (port + 10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for a port");
        let port = listener.local_addr().expect("local address").port();
        let Some(bus) = port.checked_add(10000) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
}
