//! hello: the example veil function. A small HTTP/1.1 server on std only, built as a static
//! binary so that an image needs nothing else.
//!
//! It listens on 0.0.0.0:$PORT and answers every request with a greeting that echoes the
//! request's method, path and body. Test switches: `--exit <code>` exits at once (a function
//! that crashes on start), `--never-listen` sleeps forever without listening, and a request to
//! `/crash` makes it exit with status 42 after replying, `/sleep/<ms>` answers after a pause
//! (`/sleep/<ms>/<rest>` then answers as `/<rest>`), and `/env/<NAME>` shows one environment
//! variable.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--exit") {
        let code = args.get(i + 1).and_then(|c| c.parse().ok()).unwrap_or(1);
        eprintln!("hello: exiting with {code} as asked");
        std::process::exit(code);
    }
    if args.iter().any(|a| a == "--never-listen") {
        eprintln!("hello: not listening, as asked");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hello: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("hello: listening on port {port}");
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || serve(conn));
    }
}

/// What the sandbox looks like from inside: identity, capabilities, seccomp, hostname,
/// network interfaces and whether host paths are visible. Used by isolation tests.
fn whoami() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mut out = String::new();
    for key in ["Uid", "Gid", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp"] {
        if let Some(l) = status.lines().find(|l| l.starts_with(&format!("{key}:"))) {
            let v = l.split_whitespace().nth(1).unwrap_or("");
            out.push_str(&format!("{key}={v}\n"));
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    out.push_str(&format!("hostname={}\n", host.trim()));
    let net = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    let ifs: Vec<&str> = net.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    out.push_str(&format!("interfaces={}\n", ifs.join(",")));
    out.push_str(&format!("pid={}\n", std::process::id()));
    let procs = std::fs::read_dir("/proc")
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok()).count())
        .unwrap_or(0);
    out.push_str(&format!("visible_processes={procs}\n"));
    let write_sys = std::fs::write("/proc/sys/kernel/hostname", "pwned").is_ok();
    out.push_str(&format!("can_write_proc_sys={write_sys}\n"));
    let root: Vec<String> = std::fs::read_dir("/")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let mut root = root;
    root.sort();
    out.push_str(&format!("root={}\n", root.join(",")));
    out
}

fn serve(conn: TcpStream) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("/").to_string();
        let mut length = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                let v = v.trim();
                if k == "content-length" {
                    length = v.parse().unwrap_or(0);
                } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        let mut body = vec![0u8; length.min(1 << 20)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        // `/sleep/<ms>` answers after a pause; `/sleep/<ms>/<rest>` then answers as `/<rest>`.
        let mut path = path;
        if let Some(rest) = path.strip_prefix("/sleep/") {
            let (ms, then) = rest.split_once('/').unwrap_or((rest, ""));
            if let Ok(ms) = ms.parse::<u64>() {
                std::thread::sleep(std::time::Duration::from_millis(ms.min(60_000)));
                if !then.is_empty() {
                    path = format!("/{then}");
                }
            }
        }
        let text = if path == "/whoami" {
            whoami()
        } else if path == "/chmod-dev-null" {
            use std::os::unix::fs::PermissionsExt;
            let r = std::fs::set_permissions("/dev/null", std::fs::Permissions::from_mode(0));
            format!("chmod /dev/null: {}\n", if r.is_ok() { "done" } else { "refused" })
        } else if let Some(name) = path.strip_prefix("/env/") {
            format!("{name}={}\n", std::env::var(name).unwrap_or_default())
        } else {
            format!(
            "Hello from veil! {method} {path} ({} bytes){}{}\n",
            body.len(),
            if body.is_empty() { "" } else { ": " },
            String::from_utf8_lossy(&body)
            )
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{}",
            text.len(),
            if close { "Connection: close\r\n" } else { "" },
            text
        );
        if out.write_all(resp.as_bytes()).is_err() {
            return;
        }
        println!("hello: {method} {path}");
        if path == "/crash" {
            let _ = out.flush();
            eprintln!("hello: crashing as asked");
            std::process::exit(42);
        }
        if close {
            return;
        }
    }
}
