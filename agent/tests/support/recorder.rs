//! An HTTP endpoint that answers every request with one fixed response and keeps each
//! request's head: a mirror or a token realm that should never see the origin's credentials.

use std::io::{Read as _, Write as _};

use super::*;

pub struct Recorder {
    pub addr: SocketAddr,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Recorder {
    /// Answers every request with `status` (e.g. `401 Unauthorized`), the extra header lines
    /// `headers` and `body`, and closes the connection.
    pub fn start(status: &str, headers: &[String], body: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut response = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for h in headers {
            response.push_str(h);
            response.push_str("\r\n");
        }
        response.push_str("\r\n");
        response.push_str(body);
        let kept = heads.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
                    match conn.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                kept.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let _ = conn.write_all(response.as_bytes());
            }
        });
        Self { addr, heads }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The heads of the requests received so far.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// Whether any request carried user credentials (`Authorization: Basic`).
    pub fn saw_credentials(&self) -> bool {
        self.heads()
            .iter()
            .any(|h| h.to_ascii_lowercase().contains("\r\nauthorization: basic"))
    }
}
