//! nginx as a real app behind the sidecar: started in the foreground from a
//! config in its own temp dir (pid, logs and temp paths inside it), on a
//! free loopback port, killed and removed on drop.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nginx.
pub struct Nginx {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `server_body` (the `location` blocks, and anything
    /// else that goes inside `server { }`). Each access-log line is
    /// `$status $request_uri`, the target exactly as nginx received it.
    pub fn start(server_body: &str) -> Nginx {
        assert!(
            crate::have("nginx"),
            "nginx is not installed: `./test.sh` installs it (apt-get install nginx)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = crate::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let d = dir.path().display().to_string();
        // One process, no privilege drop: it runs as whoever runs the test
        // (root in CI), and killing the child stops everything.
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 128; }}\n\
             http {{\n  log_format paths '$status $request_uri';\n  access_log {d}/access.log paths;\n\
               client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  default_type text/plain;\n\
               server {{\n    listen 127.0.0.1:{port};\n    server_name _;\n{server_body}\n  }}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut n = Nginx { child, addr, dir };
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = n.child.try_wait() {
                panic!("nginx exited with {st}:\n{}", n.error_log());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return n;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nginx never listened on {addr}:\n{}",
                n.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The access log so far, one `status request_uri` per line.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.file("access.log")).unwrap_or_default()
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.file("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
