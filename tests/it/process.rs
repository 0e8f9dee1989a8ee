//! Helpers to run the real `opsiq` binary as a child process (for `kill -9`, exit codes, CLI).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::TEST_MASTER_KEY;

/// The built binary.
pub fn opsiq() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_opsiq"));
    cmd.env("OPSIQ_MASTER_KEY", TEST_MASTER_KEY)
        .env_remove("OPSIQ_DATABASE_URL")
        .env_remove("OPSIQ_LISTEN")
        .kill_on_drop(true);
    cmd
}

/// Runs `opsiq init --json` and returns (tenant_id, admin_key).
pub async fn init(dir: &std::path::Path, database_url: &str) -> (String, String) {
    let out = opsiq()
        .current_dir(dir)
        .args(["init", "--json", "--database-url", database_url])
        .output()
        .await
        .expect("opsiq init runs");
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("init --json prints JSON");
    (
        v["tenant_id"].as_str().unwrap().to_string(),
        v["admin_key"].as_str().unwrap().to_string(),
    )
}

/// Runs `opsiq serve` with `env`, expects it to refuse to start, and returns what it printed
/// to stderr.
pub async fn serve_refused(dir: &std::path::Path, database_url: &str, env: &[(&str, &str)]) -> String {
    let run = opsiq()
        .current_dir(dir)
        .envs(env.iter().copied())
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", database_url])
        .output();
    // A serve that starts after all would run until killed: fail instead of hanging.
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("serve should have refused to start, and it kept running")
        .expect("opsiq serve runs");
    assert!(!out.status.success(), "serve started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A running `opsiq serve` child.
pub struct Server {
    /// The child process.
    pub child: Child,
    /// `http://127.0.0.1:port`.
    pub base: String,
}

/// Starts `opsiq serve` on an ephemeral port and waits for its "listening on" line.
pub async fn serve(dir: &std::path::Path, database_url: &str, extra: &[&str]) -> Server {
    serve_with(dir, database_url, extra, |_| {}).await
}

/// Like [`serve`], with a hook to adjust the command (environment) first.
pub async fn serve_with(
    dir: &std::path::Path,
    database_url: &str,
    extra: &[&str],
    adjust: impl FnOnce(&mut Command),
) -> Server {
    let mut cmd = opsiq();
    cmd.current_dir(dir)
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", database_url])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    adjust(&mut cmd);
    let mut child = cmd.spawn().expect("opsiq serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let base = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let line = lines
                .next_line()
                .await
                .expect("stdout readable")
                .expect("serve exited early");
            if let Some(base) = line.strip_prefix("listening on ") {
                return base.to_string();
            }
        }
    })
    .await
    .expect("serve printed its address in time");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Server { child, base }
}

impl Server {
    /// Sends SIGKILL and waits for the process to be gone.
    pub async fn kill_9(mut self) {
        self.child.kill().await.expect("kill -9");
    }

    /// Sends SIGTERM (a graceful stop) and answers how the process exited, within `deadline`.
    pub async fn terminate(mut self, deadline: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().expect("the process is running").to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill runs");
        assert!(sent.success(), "kill -TERM {pid} failed");
        tokio::time::timeout(deadline, self.child.wait())
            .await
            .expect("the process stopped in time")
            .expect("wait for the process")
    }
}
