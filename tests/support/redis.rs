//! A real redis-server on a free loopback port.
//!
//! `RedisServer::start()` runs a plain node, `RedisServer::start_cluster()`
//! a one-node Redis Cluster owning every slot (enough to make Redis refuse
//! any command or script whose keys span hash slots). Neither persists data.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server gets to answer PING after being spawned.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// Fresh ports tried before giving up on starting a server.
const PORT_ATTEMPTS: usize = 5;

/// A redis-server child process, killed when dropped.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// Working directory (cluster node config); kept alive with the server.
    dir: tempfile::TempDir,
    cluster: bool,
    /// TLS port and the directory holding server.crt/server.key/ca.crt.
    tls: Option<(u16, std::path::PathBuf)>,
}

impl RedisServer {
    /// Starts a plain node that also serves TLS on a second port with the
    /// certificates from `certs/gen-dev-cert.sh` in `cert_dir`.
    pub fn start_tls(cert_dir: &std::path::Path) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("create a temporary directory for redis-server"),
            cluster: false,
            tls: Some((free_port(), cert_dir.to_path_buf())),
        };
        if let Err(e) = server.spawn() {
            panic!("could not start redis-server with TLS: {e}");
        }
        server
    }

    /// `rediss://localhost:<tls port>/` (TLS servers only).
    pub fn tls_url(&self) -> String {
        let (port, _) = self.tls.as_ref().expect("a TLS server");
        format!("rediss://localhost:{port}/")
    }

    /// Starts a plain redis-server.
    pub fn start() -> RedisServer {
        RedisServer::launch(false)
    }

    /// Starts a one-node Redis Cluster that owns all 16384 slots.
    pub fn start_cluster() -> RedisServer {
        RedisServer::launch(true)
    }

    fn launch(cluster: bool) -> RedisServer {
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let mut server = RedisServer {
                port,
                child: None,
                // Fresh per attempt, so a node that failed to start cannot
                // leave a cluster config naming another port behind.
                dir: tempfile::tempdir().expect("create a temporary directory for redis-server"),
                cluster,
                tls: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                // Most likely someone else took the port between our probe
                // and the server's bind; try another one.
                Err(e) => failures.push(format!("port {port}: {e}")),
            }
        }
        panic!("could not start redis-server: {}", failures.join("; "));
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server and waits for it to exit; the port stays reserved
    /// for `start_again`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (with no data), so clients
    /// configured with `url()` can reconnect.
    pub fn start_again(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("could not restart redis-server on port {}: {e}", self.port);
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        if let Some((port, certs)) = &self.tls {
            cmd.args(["--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(certs.join("server.crt"))
                .arg("--tls-key-file")
                .arg(certs.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(certs.join("ca.crt"))
                .args(["--tls-auth-clients", "no"]);
        }
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-announce-ip", "127.0.0.1"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn redis-server: {e}"))?;
        self.child = Some(child);
        let ready = self.wait_ready().and_then(|()| {
            if self.cluster {
                self.claim_all_slots()
            } else {
                Ok(())
            }
        });
        if ready.is_err() {
            self.stop();
        }
        ready
    }

    /// Polls with PING until the server answers, it exits, or time is up.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("redis-server exited early: {status}"));
                }
            }
            if let Ok(reply) = self.command(&["PING"]) {
                if reply.starts_with("+PONG") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err("redis-server did not answer PING in time".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Gives this node every slot and waits until the cluster reports ok.
    fn claim_all_slots(&mut self) -> Result<(), String> {
        // Idempotent across restarts: a restarted node may already own them
        // from its nodes.conf, which Redis answers with an error we ignore.
        let _ = self.command(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(info) = self.command(&["CLUSTER", "INFO"]) {
                if info.contains("cluster_state:ok") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err("one-node cluster did not reach state ok".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends one command in RESP and returns the raw reply (good enough
    /// for the short replies used here).
    fn command(&self, args: &[&str]) -> std::io::Result<String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes())?;
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port nothing listened on a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local address of a bound listener")
        .port()
}
