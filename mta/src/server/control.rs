//! The admin socket `DATA_DIR/mta.sock`: `mta queue flush|hold|release|delete`
//! against a running server go through here, so they never race the
//! delivery task (a held or deleted message could otherwise be written
//! back, or delivered twice).
//!
//! One request line per connection (`flush`, `hold ID`, `release ID`,
//! `delete ID`), one answer line (`ok …` or `error …`). The socket is
//! created 0600 by root before the privileges drop, so only root talks to
//! it. [`Claims`] is the coordination: the delivery task and this socket
//! each claim a message id before touching its file.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::Shared;
use crate::queue::QueueError;

/// The socket's name inside `data_dir`.
pub const SOCKET_FILE: &str = "mta.sock";
/// An admin change waits this long for a delivery of the same message.
const CLAIM_WAIT_MS: u64 = 60_000;
/// Pause between claim attempts.
const CLAIM_POLL_MS: u64 = 20;
/// A request line is at most this long.
const REQUEST_BYTES_MAX: u64 = 256;
/// A client gets this long to send its request.
const REQUEST_DEADLINE_MS: u64 = 10_000;

/// Message ids someone is working on (delivery or an admin change).
#[derive(Default)]
pub struct Claims {
    ids: Mutex<HashSet<String>>,
}

/// Released on drop.
pub struct Claim<'a> {
    claims: &'a Claims,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.claims.ids.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl Claims {
    /// Claims `id` unless someone else holds it.
    pub fn try_claim(&self, id: &str) -> Option<Claim<'_>> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.insert(id.to_string()).then(|| Claim { claims: self, id: id.to_string() })
    }

    /// Claims `id`, waiting (bounded) for a delivery in progress to end.
    async fn claim(&self, id: &str) -> Option<Claim<'_>> {
        let deadline = Instant::now() + Duration::from_millis(CLAIM_WAIT_MS);
        loop {
            if let Some(c) = self.try_claim(id) {
                return Some(c);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(CLAIM_POLL_MS)).await;
        }
    }
}

/// Serves admin requests until `shutdown` turns true.
pub async fn serve(shared: Arc<Shared>, listener: UnixListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(REQUEST_BYTES_MAX));
            let got =
                tokio::time::timeout(Duration::from_millis(REQUEST_DEADLINE_MS), reader.read_line(&mut line)).await;
            let answer = match got {
                Ok(Ok(_)) => match handle(&shared, line.trim()).await {
                    Ok(text) => format!("ok {text}\n"),
                    Err(text) => format!("error {text}\n"),
                },
                _ => return,
            };
            let _ = write.write_all(answer.as_bytes()).await;
        });
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, QueueError> + Send + 'static) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs one request; the answer text says what was done.
async fn handle(shared: &Arc<Shared>, request: &str) -> Result<String, String> {
    let (verb, id) = request.split_once(' ').unwrap_or((request, ""));
    let queue = shared.queue.clone();
    match verb {
        "flush" => {
            let listed = blocking(move || queue.list()).await?;
            let mut n = 0usize;
            for entry in listed.into_iter().filter(|e| !e.held) {
                let mut env = entry.envelope;
                // A message being delivered right now is being tried anyway.
                let Some(_claim) = shared.claims.try_claim(&env.id) else {
                    n += 1;
                    continue;
                };
                env.next_attempt_unix = 0;
                let queue = shared.queue.clone();
                match blocking(move || queue.update(&env)).await {
                    Ok(()) => n += 1,
                    Err(e) if e.starts_with("no queued message") => {}
                    Err(e) => return Err(e),
                }
            }
            shared.delivery_wakeup.notify_one();
            tracing::info!(messages = n, "queue flushed by the admin");
            Ok(format!("{n} {} due now", if n == 1 { "message" } else { "messages" }))
        }
        "hold" | "release" | "delete" => {
            let Some(_claim) = shared.claims.claim(id).await else {
                return Err(format!("message {id} is still being delivered; try again"));
            };
            let id_owned = id.to_string();
            let done = match verb {
                "hold" => blocking(move || queue.set_held(&id_owned, true)).await.map(|()| "held"),
                "release" => blocking(move || queue.set_held(&id_owned, false)).await.map(|()| "released"),
                _ => blocking(move || queue.remove(&id_owned)).await.map(|()| "deleted"),
            }?;
            if verb == "release" {
                shared.delivery_wakeup.notify_one();
            }
            tracing::info!(id, action = done, "queue change by the admin");
            Ok(format!("{done} {id}"))
        }
        _ => Err(format!("unknown request {verb:?}")),
    }
}
