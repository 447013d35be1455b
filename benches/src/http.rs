//! Our HTTP/1.1 client: a GET on a new connection (`Connection: close`),
//! timed from before `connect` to the last byte of the body, or GETs on a
//! kept-alive connection. Only what nginx answers for a static file is
//! understood: a 200 with `Content-Length`.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use socket2::{Domain, Socket, Type};

use crate::clock::now_ns;

/// One answered request.
#[derive(Debug, Clone, Copy)]
pub struct Response {
    /// `CLOCK_MONOTONIC` before `connect` (or before the write on a kept-alive connection).
    pub start_ns: u64,
    /// When the last byte of the body was read.
    pub last_byte_ns: u64,
    pub body_bytes: usize,
}

impl Response {
    /// Connect (or send) to last byte.
    pub fn elapsed_ns(&self) -> u64 {
        self.last_byte_ns - self.start_ns
    }
}

fn request(path: &str, close: bool) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: netpol-bench\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// Reads one response: headers, then `Content-Length` bytes of body.
/// Returns the body length and when its last byte arrived. `buf` is scratch
/// space (reused between calls to avoid allocations).
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<(usize, u64)> {
    if buf.len() < 64 * 1024 {
        buf.resize(64 * 1024, 0);
    }
    let mut have = 0;
    let header_end = loop {
        let n = stream.read(&mut buf[have..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the headers ended",
            ));
        }
        have += n;
        if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if have == buf.len() {
            return Err(io::Error::other("response headers too long"));
        }
    };
    let head = std::str::from_utf8(&buf[..header_end])
        .map_err(|_| io::Error::other("response headers are not UTF-8"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(io::Error::other(format!(
            "HTTP status {status}: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| io::Error::other("response without Content-Length"))?;
    let mut body = have - header_end;
    let mut last = now_ns();
    while body < length {
        let n = stream.read(&mut buf[..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {body} of {length} body bytes"),
            ));
        }
        body += n;
        last = now_ns();
    }
    if body > length {
        return Err(io::Error::other("more bytes than Content-Length"));
    }
    Ok((length, last))
}

/// A GET on a new TCP connection with `Connection: close`, timed from
/// before `connect` to the last byte of the body. Afterwards it reads until
/// the server closes, so the server closes first and the client keeps no
/// TIME_WAIT socket (no ephemeral port exhaustion in long runs).
pub fn get_close(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    buf: &mut Vec<u8>,
) -> io::Result<Response> {
    get_close_from(None, addr, path, timeout, buf)
}

/// [`get_close`] from a given local port (`None`: the kernel picks one).
/// Fails with `AddrInUse` when the port is taken.
pub fn get_close_from(
    local_port: Option<u16>,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    buf: &mut Vec<u8>,
) -> io::Result<Response> {
    let start_ns = now_ns();
    let mut stream: TcpStream = match local_port {
        None => TcpStream::connect_timeout(&addr, timeout)?,
        Some(port) => {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            let local = match addr {
                SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], port)),
                SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], port)),
            };
            socket.bind(&local.into())?;
            socket.connect_timeout(&addr.into(), timeout)?;
            socket.into()
        }
    };
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(&request(path, true))?;
    let (body_bytes, last_byte_ns) = read_response(&mut stream, buf)?;
    // Drain until the server's FIN (normally already here).
    while stream.read(&mut buf[..])? > 0 {}
    Ok(Response {
        start_ns,
        last_byte_ns,
        body_bytes,
    })
}

/// GETs on one kept-alive connection, reconnecting after an error.
#[derive(Debug)]
pub struct KeepAlive {
    addr: SocketAddr,
    timeout: Duration,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl KeepAlive {
    pub fn new(addr: SocketAddr, timeout: Duration) -> KeepAlive {
        KeepAlive {
            addr,
            timeout,
            stream: None,
            buf: Vec::new(),
        }
    }

    /// One GET, timed from before the write (or before `connect`, when the
    /// connection has to be opened) to the last byte.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        let start_ns = now_ns();
        let result = self.try_get(path);
        if result.is_err() {
            self.stream = None;
        }
        let (body_bytes, last_byte_ns) = result?;
        Ok(Response {
            start_ns,
            last_byte_ns,
            body_bytes,
        })
    }

    fn try_get(&mut self, path: &str) -> io::Result<(usize, u64)> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            self.stream = Some(s);
        }
        let stream = self.stream.as_mut().expect("connected above");
        stream.write_all(&request(path, false))?;
        read_response(stream, &mut self.buf)
    }
}
