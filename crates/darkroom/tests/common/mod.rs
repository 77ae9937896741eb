//! Starts real `darkroom serve` processes on 127.0.0.1 for end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const APP: &str = "darkroom/diagnostics";

pub struct Server {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub url: String,
    pub admin: String,
    pub http: reqwest::Client,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

impl Server {
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        Server::start_with_env(dir, args, &[])
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let _ = std::fs::remove_file(dir.join("server.json"));
        let child = Command::new(env!("CARGO_BIN_EXE_darkroom"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(&args)
            .env("DARKROOM_LOG", "warn")
            // Tests that end with requests still running should not wait out the default drain.
            .env("DARKROOM_DRAIN_TIMEOUT_SECS", "1")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn darkroom serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        let info = loop {
            if let Some(v) = read_json(&dir.join("server.json"))
                && v["pid"].as_u64() == Some(child.id() as u64)
            {
                break v;
            }
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let admin = std::fs::read_to_string(dir.join("local-admin.key")).unwrap().trim().to_string();
        let mut b = reqwest::Client::builder().no_proxy();
        if let Some(ca) = info["ca_cert"].as_str() {
            b = b.tls_certs_merge([reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap()]);
        }
        let http = b.build().unwrap();
        Server {
            child: Some(child),
            dir: dir.to_path_buf(),
            url: info["url"].as_str().unwrap().to_string(),
            admin,
            http,
            args,
            env,
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// A client trusting the server's local CA (for `--tls` servers).
    pub fn http_tls(&self) -> reqwest::Client {
        self.http.clone()
    }

    pub fn auth(&self) -> String {
        format!("Key {}", self.admin)
    }

    /// Waits (bounded) until `n` runners are ready for work (the fleet also lists starting and ended ones).
    pub async fn wait_runners(&self, n: usize) -> Vec<Value> {
        let ready = |r: &Value| matches!(r["state"].as_str(), Some("IDLE" | "RUNNING"));
        let rs = self.wait_fleet("runners did not connect", |rs| rs.iter().filter(|r| ready(r)).count() >= n).await;
        rs.into_iter().filter(ready).collect()
    }

    pub async fn submit(&self, input: Value) -> Value {
        self.submit_with(input, &[]).await
    }

    pub async fn submit_with(&self, input: Value, headers: &[(&str, &str)]) -> Value {
        let mut rb =
            self.http.post(format!("{}/queue/{APP}", self.url)).header("authorization", self.auth()).json(&input);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 200, "submit failed");
        r.json().await.unwrap()
    }

    pub async fn status(&self, id: &str) -> Value {
        self.status_in(APP, id).await
    }

    /// The status (with logs) of a request to `app`.
    pub async fn status_in(&self, app: &str, id: &str) -> Value {
        self.http
            .get(format!("{}/queue/{app}/requests/{id}/status?logs=1", self.url))
            .header("authorization", self.auth())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits (bounded) until the request is COMPLETED, then returns (status code, body) of its result.
    pub async fn result(&self, id: &str) -> (u16, Value) {
        self.result_in(APP, id).await
    }

    /// [`Server::result`] for a request to `app`.
    pub async fn result_in(&self, app: &str, id: &str) -> (u16, Value) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status_in(app, id).await;
            if s["status"] == "COMPLETED" {
                break;
            }
            assert!(Instant::now() < deadline, "request {id} did not complete: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = self
            .http
            .get(format!("{}/queue/{app}/requests/{id}", self.url))
            .header("authorization", self.auth())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    pub async fn wait_status(&self, id: &str, want: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status(id).await;
            if s["status"] == want {
                return s;
            }
            assert!(Instant::now() < deadline, "request {id} never reached {want}: {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// After a crash: every request completed with its own echo, those running at the crash on a second attempt, and
    /// each exactly once without error (the store refuses second completions: conformance).
    pub async fn assert_all_ran_once_more_at_most(&self, ids: &[String]) {
        let mut attempts = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let (code, out) = self.result(id).await;
            assert_eq!(code, 200, "{id}: {out}");
            assert_eq!(out["echo"], serde_json::json!(i));
            attempts.push(out["attempt"].as_i64().unwrap());
        }
        assert!(attempts.contains(&2), "jobs running at the crash ran again: {attempts:?}");
        assert!(attempts.iter().all(|a| *a <= 2), "{attempts:?}");
        let v: Value = self
            .http
            .get(format!("{}/v1/requests?limit=1000", self.url))
            .header("authorization", self.auth())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ok = v["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["status"] == "COMPLETED" && r["error_type"].is_null())
            .count();
        assert_eq!(ok, ids.len(), "{v}");
    }

    /// The value of a metric without labels, from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.http.get(format!("{}/metrics", self.url)).send().await.ok()?.text().await.ok()?;
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// A request with the admin key: (status, JSON body).
    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self.http.request(method, format!("{}{path}", self.url)).header("authorization", self.auth());
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Every runner the fleet lists (all states).
    pub async fn runners(&self) -> Vec<Value> {
        self.call(reqwest::Method::GET, "/v1/runners", None).await.1["runners"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (bounded) until `f` holds for the runner list; returns it.
    pub async fn wait_fleet(&self, what: &str, f: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rs = self.runners().await;
            if f(&rs) {
                return rs;
            }
            assert!(Instant::now() < deadline, "{what}: {rs:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn post_json(&self, path: &str, body: Value) -> Value {
        self.http
            .post(format!("{}{path}", self.url))
            .header("authorization", self.auth())
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM for a clean shutdown of the runners, then make sure.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn pid_alive(pid: i32) -> bool {
    unsafe { libc::kill(pid, 0) == 0 }
}
