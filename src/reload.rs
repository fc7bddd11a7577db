//! Config reloads. Three triggers: an inotify watch on the config file's *directory* (a
//! Kubernetes ConfigMap volume swaps the file through a `..data` symlink, which a watch on the
//! file itself would miss), SIGHUP, and a periodic content check in case an event was lost.
//! A reload happens only when the file's content changed (SIGHUP: always); a file that fails
//! validation is reported once and the config in use keeps serving.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::app::State;
use crate::{config, metrics};

/// Events come in bursts (a ConfigMap swap is several renames): wait for the burst to end.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// The periodic check; keeps "picked up within 5 s" true even if no event arrives.
const POLL: Duration = Duration::from_secs(2);
/// A changed file is read twice this far apart and used only if both reads agree, so a file
/// caught while an editor rewrites it in place is not taken for the new config.
const SETTLE: Duration = Duration::from_millis(100);

/// Watch for config changes until `stop` turns true.
pub async fn watch(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let (events_tx, mut events) = mpsc::channel::<()>(1);
    let _watcher = watch_directory(&state.config_path, events_tx);
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("cannot install the SIGHUP handler: {e}");
            None
        }
    };
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reloader = Reloader::default();
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                tracing::info!("SIGHUP: reloading {}", state.config_path.display());
                reloader.reload(&state, true).await;
            }
            Some(()) = events.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while events.try_recv().is_ok() {}
                reloader.reload(&state, false).await;
            }
            _ = poll.tick() => reloader.reload(&state, false).await,
        }
    }
}

/// A non-recursive inotify watch on the directory holding the config file. Any event there
/// means "maybe changed": the content check decides.
fn watch_directory(path: &Path, events: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = events.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("cannot watch {}: {e}; checking every {POLL:?} instead", dir.display());
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
        tracing::warn!("cannot watch {}: {e}; checking every {POLL:?} instead", dir.display());
        return None;
    }
    Some(watcher)
}

/// The file's content once two reads [`SETTLE`] apart agree; `None` while it is changing.
async fn read_settled(path: &Path) -> std::io::Result<Option<String>> {
    let first = tokio::fs::read_to_string(path).await?;
    tokio::time::sleep(SETTLE).await;
    let second = tokio::fs::read_to_string(path).await?;
    Ok((first == second).then_some(second))
}

/// Remembers the last content that failed, so a broken file is reported once, not every poll.
#[derive(Default)]
struct Reloader {
    failed_hash: Option<String>,
    read_error: Option<String>,
}

impl Reloader {
    async fn reload(&mut self, state: &State, forced: bool) {
        let path = &state.config_path;
        let text = match read_settled(path).await {
            Ok(None) => return, // being written: the next event or poll reads it
            Ok(Some(text)) => {
                self.read_error = None;
                text
            }
            Err(e) => {
                // A ConfigMap swap can make the file vanish for a moment: say it once.
                let message = e.to_string();
                if forced || self.read_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!("cannot read {}: {message}; keeping the config in use", path.display());
                    self.read_error = Some(message);
                }
                return;
            }
        };
        let hash = config::hash_text(&text);
        let unchanged = hash == state.snapshot().config.hash || self.failed_hash.as_deref() == Some(hash.as_str());
        if unchanged && !forced {
            return;
        }
        let result = config::parse(&text)
            .map_err(|errors| {
                errors
                    .iter()
                    .map(|d| config::located(path, d, "error"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .and_then(|loaded| {
                for w in &loaded.warnings {
                    tracing::warn!("{}", config::located(path, w, "warning"));
                }
                state.apply(loaded.config)
            });
        match result {
            Ok(()) => {
                self.failed_hash = None;
                metrics::record_config_reload(true);
            }
            Err(errors) => {
                tracing::error!("config reload failed; the config in use keeps serving:\n{errors}");
                self.failed_hash = Some(hash);
                metrics::record_config_reload(false);
            }
        }
    }
}
