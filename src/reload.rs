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
    // raised no event: catch up now.
    let on_disk = std::fs::read(&path).map(|text| crate::config::source_digest(&text));
    if on_disk.ok() != Some(gateway.config().digest) {
        let _ = tx.send(());
    }
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
            reload_now(&gateway, &path);
        }
    });
    ReloadGuard {
        task,
        _watcher: watcher,
    }
}
