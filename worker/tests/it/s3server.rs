//! A real S3-compatible server for tests: the `s3s-fs` binary (installed by `.ci/run` with
//! `cargo install --locked s3s-fs@0.14.1 --features binary`), started on a free loopback port
//! over a temp folder, with SigV4 credentials enforced. Stop and start it to cause outages.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "kilntest";
pub const SECRET_KEY: &str = "kilntestsecret";

pub struct S3Server {
    pub endpoint: String,
    port: u16,
    root: tempfile::TempDir,
    child: Option<Child>,
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_TEST_S3S_FS") {
        return p.into();
    }
    let home_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/s3s-fs"));
    match home_bin {
        Some(p) if p.exists() => p,
        _ => "s3s-fs".into(),
    }
}

impl S3Server {
    pub fn start() -> S3Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            root: tempfile::tempdir().unwrap(),
            child: None,
        };
        s.resume();
        s
    }

    /// Starts the server again on the same port and folder (objects survive).
    pub fn resume(&mut self) {
        let child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting s3s-fs ({}): {e}; install it with \
                     `cargo install --locked s3s-fs@0.14.1 --features binary`",
                    binary().display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL); the port stops answering.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn options(&self) -> kiln_worker::upload::S3Options {
        kiln_worker::upload::S3Options {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            path_style: true,
            access_key: Some(ACCESS_KEY.into()),
            secret_key: Some(SECRET_KEY.into()),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
