//! The client commands of the CLI (`submit`, `list`, `status`, `checkpoints`, `savepoint`,
//! `stop`, `cancel`, `restore`): one REST call each, printed as text or as one JSON object.

use super::client::Client;
use super::server::{RestoreRequest, SavepointRequest, SubmitRequest};
use std::process::ExitCode;

/// What a command asks of the coordinator.
pub enum Call {
    /// Submit a job.
    Submit(SubmitRequest),
    /// Resubmit a snapshot's job.
    Restore(RestoreRequest),
    /// Every job.
    List,
    /// One job's status.
    Status(String),
    /// One job's checkpoints.
    Checkpoints(String),
    /// A savepoint of a job, under a target or the default.
    Savepoint(String, Option<String>),
    /// Stop a job with a savepoint.
    Stop(String, Option<String>),
    /// Cancel a job.
    Cancel(String),
}

/// A command with where it goes and how it prints.
pub struct Request {
    /// The coordinator's address.
    pub coordinator: String,
    /// The secret, if given.
    pub secret: Option<String>,
    /// Print one JSON object instead of text.
    pub json: bool,
    /// The call.
    pub call: Call,
}

/// Runs one client command.
pub fn run(request: Request) -> Result<ExitCode, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let client = Client::new(&request.coordinator, request.secret.clone())?;
    let waiting = |what: &str| -> indicatif::ProgressBar {
        // A spinner on a terminal only: scripts read stdout, and JSON output stays clean.
        if request.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new_spinner().with_message(what.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        bar
    };
    let value = runtime.block_on(async {
        match &request.call {
            Call::Submit(body) => client.post("/v1/jobs", body).await,
            Call::Restore(body) => {
                let bar = waiting(&format!("restoring {}", body.url));
                let answer = client.post("/v1/restore", body).await;
                bar.finish_and_clear();
                answer
            }
            Call::List => client.get("/v1/jobs").await,
            Call::Status(id) => client.get(&format!("/v1/jobs/{}", path_segment(id))).await,
            Call::Checkpoints(id) => client.get(&format!("/v1/jobs/{}/checkpoints", path_segment(id))).await,
            Call::Savepoint(id, target) | Call::Stop(id, target) => {
                let stop = matches!(request.call, Call::Stop(..));
                let bar = waiting(if stop {
                    "stopping with a savepoint"
                } else {
                    "taking a savepoint"
                });
                let path = if stop { "stop" } else { "savepoints" };
                let body = SavepointRequest { target: target.clone() };
                let answer = client
                    .post(&format!("/v1/jobs/{}/{path}", path_segment(id)), &body)
                    .await;
                bar.finish_and_clear();
                answer
            }
            Call::Cancel(id) => {
                client
                    .post(&format!("/v1/jobs/{}/cancel", path_segment(id)), &serde_json::json!({}))
                    .await
            }
        }
    })?;
    if request.json {
        println!("{value}");
    } else {
        print_text(&request.call, &value);
    }
    Ok(ExitCode::SUCCESS)
}

/// A job id as one path segment: anything but `[0-9A-Za-z_-]` is percent-encoded.
fn path_segment(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn field<'a>(v: &'a serde_json::Value, name: &str) -> std::borrow::Cow<'a, str> {
    match v.get(name) {
        Some(serde_json::Value::String(s)) => s.as_str().into(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(other) => other.to_string().into(),
    }
}

fn print_text(call: &Call, v: &serde_json::Value) {
    match call {
        Call::Submit(_) | Call::Restore(_) => println!("{}", field(v, "job_id")),
        Call::Savepoint(..) | Call::Stop(..) => println!("{}", field(v, "url")),
        Call::Cancel(_) => println!("{} {}", field(v, "job_id"), field(v, "state")),
        Call::Status(_) => {
            println!(
                "job {} ({}): {}",
                field(v, "job_id"),
                field(v, "name"),
                field(v, "state")
            );
            println!(
                "  parallelism {}, restarts {}, checkpoints {} completed / {} failed",
                field(v, "parallelism"),
                field(v, "restarts"),
                field(v, "completed_checkpoints"),
                field(v, "failed_checkpoints")
            );
            if let Some(f) = v.get("failure").and_then(|f| f.as_str()) {
                println!("  failure: {f}");
            }
        }
        Call::List => {
            let jobs = v.get("jobs").and_then(|j| j.as_array()).cloned().unwrap_or_default();
            if jobs.is_empty() {
                println!("no jobs");
            }
            for j in jobs {
                println!(
                    "{}  {:<10}  {}",
                    field(&j, "job_id"),
                    field(&j, "state"),
                    field(&j, "name")
                );
            }
        }
        Call::Checkpoints(_) => {
            let completed = v
                .get("completed")
                .and_then(|c| c.as_array())
                .cloned()
                .unwrap_or_default();
            for c in &completed {
                println!(
                    "chk-{}  {} ms  {} bytes uploaded  {} bytes of state",
                    field(c, "id"),
                    field(c, "duration_ms"),
                    field(c, "bytes"),
                    field(c, "state_bytes")
                );
            }
            println!(
                "{} completed, {} failed; retained: {}",
                completed.len(),
                field(v, "failed"),
                field(v, "retained")
            );
        }
    }
}
