//! The module's own thread: a small tokio runtime that runs the issuers' periodic key refresh,
//! the refetches checks ask for (an unknown `kid`, a new tenant), config reloads, and the
//! hand-over of its counts to Envoy's main thread. Envoy's worker threads never wait on it:
//! they stop the stream and are resumed through Envoy's scheduler.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use audgate_core::config;
use audgate_keys::{IssuerKeys, KeyStore};
use tokio::sync::oneshot;

use crate::filter::{Shared, Snapshot};
use crate::metrics::Recording;
use crate::{Level, log};

/// How often the config file is compared with the one in use (as `audgate serve`'s periodic check).
const POLL: Duration = Duration::from_secs(2);
/// A changed file is read twice this far apart and used only if both reads agree.
const SETTLE: Duration = Duration::from_millis(100);
/// How often counts made here (key refreshes, reloads, token cache hits) are handed to Envoy.
const FLUSH: Duration = Duration::from_secs(1);

pub struct Background {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Start the thread: refresh `fresh` issuers' keys and watch the config file, whose
    /// content in use is `text`.
    pub fn start(shared: Arc<Shared>, fresh: Vec<Arc<IssuerKeys>>, text: Vec<u8>) -> std::io::Result<Background> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let _ = shared.runtime.set(handle.clone());
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("audgate-keys".to_owned())
            .spawn(move || {
                // every task runs on this thread (a current-thread runtime): the key caches'
                // counts (refreshes, new token caches of reloads) go to this config's stats
                let recording = Recording(Arc::clone(&shared.pending));
                let _recorder = ::metrics::set_default_local_recorder(&recording);
                runtime.block_on(async move {
                    KeyStore::spawn_refresh(fresh);
                    tokio::select! {
                        () = watch_config(Arc::clone(&shared), text) => {}
                        () = flush(shared) => {}
                        _ = stopped => {}
                    }
                });
                // dropping the runtime cancels the refresh and refetch tasks
            })?;
        Ok(Background {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Hand the counts made since the last tick (the workers' decisions, and what was counted off
/// them) to Envoy's main thread, when there are any.
async fn flush(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(FLUSH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.current().counts.drain();
        if shared.pending.any()
            && let Some(notify) = shared.notify.get()
        {
            notify();
        }
    }
}

/// Reload the config when the file's content changes; a file that fails validation is
/// reported once (with its file:line:column errors) and the config in use keeps serving.
async fn watch_config(shared: Arc<Shared>, mut in_use: Vec<u8>) {
    let mut rejected: Option<Vec<u8>> = None;
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        poll.tick().await;
        let Ok(first) = std::fs::read(&shared.path) else {
            continue;
        };
        if first == in_use || rejected.as_ref() == Some(&first) {
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        match std::fs::read(&shared.path) {
            Ok(second) if second == first => {}
            _ => continue,
        }
        let text = String::from_utf8_lossy(&first).into_owned();
        match reload(&shared, &text) {
            Ok(hash) => {
                log(
                    Level::Info,
                    &format!("audgate: config reloaded from {} (hash {hash})", shared.path.display()),
                );
                shared.pending.reload(true);
                in_use = first;
                rejected = None;
            }
            Err(errors) => {
                log(
                    Level::Error,
                    &format!(
                        "audgate: config reload rejected, the config in use keeps serving:\n{}",
                        errors.join("\n")
                    ),
                );
                shared.pending.reload(false);
                rejected = Some(first);
            }
        }
    }
}

fn reload(shared: &Shared, text: &str) -> Result<String, Vec<String>> {
    let loaded = config::parse(text).map_err(|errors| {
        errors
            .iter()
            .map(|d| config::located(&shared.path, d, "error"))
            .collect::<Vec<_>>()
    })?;
    let previous = shared.current();
    let (keys, fresh) = KeyStore::build(&loaded.config, Some(&previous.keys)).map_err(|e| vec![e])?;
    KeyStore::spawn_refresh(fresh);
    let hash = loaded.config.hash.clone();
    shared.replace(Snapshot::new(loaded.config, keys, Arc::clone(&shared.pending)));
    Ok(hash)
}
