//! Policy reload: on SIGHUP and when the config file changes, the file is
//! validated whole and swapped in atomically; a bad edit keeps the last
//! good policy and logs every problem.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::gateway::Gateway;

/// Stops watching when dropped.
pub struct ReloadGuard {
    task: tokio::task::JoinHandle<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Drop for ReloadGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reload `path` into `gateway` now. Returns whether the new policy is live.
///
/// Reading the config and the files it names, parsing, and loading keys and
/// certificates all block, and a hostile file may take a while to refuse:
/// all of it runs on the blocking pool, never on a runtime worker that
/// serves requests.
pub async fn reload(gateway: Arc<Gateway>, path: PathBuf) -> bool {
    let metrics = gateway.metrics.clone();
    match tokio::task::spawn_blocking(move || reload_now(&gateway, &path)).await {
        Ok(ok) => ok,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the last good policy");
            metrics.reload(false);
            false
        }
    }
}

/// [`reload`], on the calling thread (blocking).
pub fn reload_now(gateway: &Gateway, path: &Path) -> bool {
    let ok = match Config::load(path) {
        Ok(cfg) => match gateway.reload(cfg) {
            Ok(()) => {
                tracing::info!(file = %path.display(), "policy reloaded");
                true
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "reload failed; keeping the last good policy");
                false
            }
        },
        Err(e) => {
            for line in e.to_string().lines() {
                tracing::error!("{line}");
            }
            tracing::error!(file = %path.display(), "config invalid; keeping the last good policy");
            false
        }
    };
    // A successful reload is counted by `Gateway::reload` itself, before
    // the swap, so the counter never lags behind the policy it reports.
    if !ok {
        gateway.metrics.reload(false);
    }
    ok
}

/// SIGHUP, registered now. Call this before serving: until a handler is
/// registered, SIGHUP's default action ends the process.
#[cfg(unix)]
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

/// Watch `path` (and the `hangups` stream) and reload on change.
#[cfg(unix)]
pub fn watch(
    gateway: Arc<Gateway>,
    path: PathBuf,
    hangups: Option<tokio::signal::unix::Signal>,
) -> ReloadGuard {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    // Watch the directory: editors and ConfigMap updates replace the file
    // by rename, which a watch on the file itself would miss.
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = path.file_name().map(|n| n.to_os_string());
    let fs_tx = tx.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            let ours = ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
                || ev.paths.iter().any(|p| p.ends_with("..data"));
            if ours && !ev.kind.is_access() {
                let _ = fs_tx.send(());
            }
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config file; reload with SIGHUP");
            None
        }
    };
    // An edit made after the config was loaded but before the watch began
    // raised no event: catch up first (reading the file off the workers).
    let catch_up = tx.clone();
    let (g, p) = (gateway.clone(), path.clone());
    tokio::spawn(async move {
        let on_disk = tokio::task::spawn_blocking(move || {
            crate::config::read_bounded(&p).map(|text| crate::config::source_digest(&text))
        })
        .await;
        if !matches!(on_disk, Ok(Ok(d)) if d == g.config().digest) {
            let _ = catch_up.send(());
        }
    });
    if let Some(mut hup) = hangups {
        let tx = tx.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if tx.send(()).is_err() {
                    break;
                }
            }
        });
    }
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: an editor's save is several events.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            reload(gateway.clone(), path.clone()).await;
        }
    });
    ReloadGuard {
        task,
        _watcher: watcher,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "\
listen: { address: 127.0.0.1:0 }
admin: { address: 127.0.0.1:0 }
upstream: { url: http://127.0.0.1:9 }
identity:
  jwt: { algorithms: [HS256], secret: 0123456789abcdef0123456789abcdef }
stepup:
  token: { signing_key: fedcba9876543210fedcba9876543210 }
  console: true
dev: true
";

    #[tokio::test(flavor = "current_thread")]
    // A reload must not block a runtime worker: the config is read from a
    // FIFO whose writer waits for a signal from this runtime's only thread.
    // Were the read done on that thread, the signal could never be sent (the
    // writer gives up after 30 s and the test fails instead of hanging).
    async fn reload_reads_off_the_runtime_workers() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let fifo = dir.path().join("gateway.yaml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .is_ok_and(|s| s.success());
        assert!(made, "mkfifo");
        let config =
            Config::from_yaml(&fifo, CONFIG, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let gateway = Gateway::new(config).unwrap_or_else(|e| panic!("{e}"));

        let (go, wait) = std::sync::mpsc::channel::<()>();
        let writer_fifo = fifo.clone();
        let writer = std::thread::spawn(move || {
            let signalled = wait.recv_timeout(Duration::from_secs(30)).is_ok();
            let edited = CONFIG.replace("console: true", "console: true\n  prefix: /.sg");
            std::fs::write(&writer_fifo, edited).unwrap_or_else(|e| panic!("{e}"));
            signalled
        });

        let reloading = tokio::spawn(reload(gateway.clone(), fifo.clone()));
        // Let the reload start (and block, if it blocked this thread).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let _ = go.send(());
        let live = reloading.await.unwrap_or_else(|e| panic!("{e}"));
        let signalled = writer.join().unwrap_or_else(|_| panic!("writer panicked"));
        assert!(signalled, "the runtime thread was blocked by the reload");
        assert!(live, "the edited config is valid and goes live");
        assert_eq!(gateway.config().stepup.prefix, "/.sg");
    }

    #[tokio::test]
    // One build per load: the gateway serves with the objects its config's
    // build step built (the very store), not copies it builds again; a
    // reload keeps the first store (fixed for the process) and drops the
    // one its own load built.
    async fn the_gateway_serves_with_what_the_load_built() {
        let path = Path::new("gateway.yaml");
        let config =
            Config::from_yaml(path, CONFIG, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let built = config.built.store.clone();
        let gateway = Gateway::new(config).unwrap_or_else(|e| panic!("{e}"));
        assert!(Arc::ptr_eq(gateway.store(), &built));
        let edited = CONFIG.replace("console: true", "console: true\n  prefix: /.sg");
        let next =
            Config::from_yaml(path, &edited, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let unused = next.built.store.clone();
        gateway.reload(next).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(gateway.config().stepup.prefix, "/.sg");
        assert!(Arc::ptr_eq(gateway.store(), &built));
        assert!(!Arc::ptr_eq(gateway.store(), &unused));
    }

    #[tokio::test]
    // A hostile edit (deeply nested) is refused fast and the last good
    // policy stays.
    async fn hostile_edit_keeps_the_last_good_policy() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("gateway.yaml");
        let config =
            Config::from_yaml(&path, CONFIG, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let gateway = Gateway::new(config).unwrap_or_else(|e| panic!("{e}"));
        let deep = format!(
            "{CONFIG}routes: {}{}\n",
            "[".repeat(60_000),
            "]".repeat(60_000)
        );
        std::fs::write(&path, deep).unwrap_or_else(|e| panic!("{e}"));
        assert!(!reload(gateway.clone(), path.clone()).await);
        assert_eq!(gateway.config().stepup.prefix, "/.stepgate");
    }
}
