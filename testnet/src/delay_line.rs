//! Real network delays without `sch_netem`: a delay line between network
//! namespaces.
//!
//! Each region of a [`Topology`] is a network namespace with one TUN
//! device. The root namespace (where the test runs) gets one as well, as
//! the region [`HOST`]. Every TUN carries an address of one /24, so a
//! packet from any region to any other leaves through its TUN and reaches
//! this process: one thread per TUN reads it, looks up the destination's
//! region by address, and queues it; one thread writes each packet to the
//! destination's TUN when its link's one-way delay (half the configured
//! RTT) has passed, after the link's rate allows it, unless the link's
//! loss drops it. Nodes in a region run inside its namespace (`ip netns
//! exec`) and listen on its address.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for `setns`), `ip` from
//! iproute2 and `/dev/net/tun`; [`DelayLine::start`] says which is missing.
//! Everything it creates carries this process's id in its name and is
//! removed when the [`DelayLine`] is dropped.

use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The region of the root namespace (the test process itself).
pub const HOST: &str = "host";

/// One link between two regions, the same both ways.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Link {
    /// Round-trip time: each direction holds packets for half of it.
    pub rtt: Duration,
    /// Share of packets dropped, each direction, 0.0 to 1.0.
    pub loss: f64,
    /// Bytes per second each direction carries; `None` for no limit.
    pub rate_bytes_per_s: Option<u64>,
}

impl Link {
    /// A link with this RTT, no loss, no rate limit.
    pub fn rtt_ms(ms: u64) -> Self {
        Self {
            rtt: Duration::from_millis(ms),
            ..Self::default()
        }
    }
}

/// Regions and the links between them. Two regions without a link of
/// their own are joined by a link with no delay; within a region traffic
/// never leaves the namespace.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    regions: Vec<String>,
    links: HashMap<(usize, usize), Link>,
}

impl Topology {
    /// An empty topology: only [`HOST`].
    pub fn new() -> Self {
        Self {
            regions: vec![HOST.to_string()],
            links: HashMap::new(),
        }
    }

    /// Adds a region (a lowercase name of at most 8 letters or digits).
    pub fn region(mut self, name: &str) -> Self {
        if !self.regions.iter().any(|r| r == name) {
            self.regions.push(name.to_string());
        }
        self
    }

    /// Sets the link between regions `a` and `b` (both added if missing).
    pub fn link(mut self, a: &str, b: &str, link: Link) -> Self {
        self = self.region(a).region(b);
        let (i, j) = (self.index(a), self.index(b));
        self.links.insert((i.min(j), i.max(j)), link);
        self
    }

    fn index(&self, name: &str) -> usize {
        self.regions
            .iter()
            .position(|r| r == name)
            .unwrap_or(usize::MAX)
    }

    fn between(&self, a: usize, b: usize) -> Link {
        self.links
            .get(&(a.min(b), a.max(b)))
            .copied()
            .unwrap_or_default()
    }

    fn check(&self) -> Result<(), String> {
        if self.regions.len() > 200 {
            return Err(format!("{} regions; at most 200", self.regions.len()));
        }
        for r in &self.regions {
            check_name("region", r)?;
        }
        for ((a, b), l) in &self.links {
            if !(0.0..=1.0).contains(&l.loss) {
                return Err(format!(
                    "link {}–{}: loss {} is not between 0 and 1",
                    self.regions[*a], self.regions[*b], l.loss
                ));
            }
            if l.rate_bytes_per_s == Some(0) {
                return Err(format!(
                    "link {}–{}: a rate of 0 carries nothing",
                    self.regions[*a], self.regions[*b]
                ));
            }
        }
        Ok(())
    }
}

/// Checks a region's or site's name, which goes into namespace names: 1 to
/// 8 lowercase letters or digits.
pub(crate) fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 8
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return Err(format!(
            "{kind} name {name:?}: 1 to 8 lowercase letters or digits"
        ));
    }
    Ok(())
}

/// Runs a command; its stderr on failure.
pub(crate) fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A packet on its way, ordered by when it is due (earliest first).
struct Queued {
    due: Instant,
    seq: u64,
    to: usize,
    packet: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// What the reader threads share with the writer.
struct Shared {
    topology: Topology,
    /// The first three octets of the /24 (region `r` is `.r+1`).
    subnet: [u8; 3],
    queue: Mutex<Pending>,
    wake: Condvar,
    stop: AtomicBool,
}

#[derive(Default)]
struct Pending {
    heap: BinaryHeap<Queued>,
    seq: u64,
    /// When each directed link is next free to send (its rate).
    free_at: HashMap<(usize, usize), Instant>,
    /// Packets carried, dropped by loss, and not routable.
    carried: u64,
    lost: u64,
    unroutable: u64,
}

impl Shared {
    /// The region whose TUN has address `dst`.
    fn region_of(&self, dst: [u8; 4]) -> Option<usize> {
        if dst[..3] != self.subnet {
            return None;
        }
        let r = usize::from(dst[3]).checked_sub(1)?;
        (r < self.topology.regions.len()).then_some(r)
    }

    /// Queues a packet read from region `from`'s TUN.
    fn route(&self, from: usize, packet: &[u8]) {
        // IPv4 only: the version nibble, and the destination at 16..20.
        let dst = match packet {
            [first, ..] if first >> 4 == 4 && packet.len() >= 20 => {
                [packet[16], packet[17], packet[18], packet[19]]
            }
            _ => {
                self.queue
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .unroutable += 1;
                return;
            }
        };
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let Some(to) = self.region_of(dst).filter(|&to| to != from) else {
            q.unroutable += 1;
            return;
        };
        let link = self.topology.between(from, to);
        if link.loss > 0.0 && rand_unit() < link.loss {
            q.lost += 1;
            return;
        }
        let now = Instant::now();
        let sent = match link.rate_bytes_per_s {
            Some(rate) => {
                let free = q.free_at.get(&(from, to)).copied().unwrap_or(now).max(now);
                let done = free + Duration::from_secs_f64(packet.len() as f64 / rate as f64);
                q.free_at.insert((from, to), done);
                done
            }
            None => now,
        };
        q.seq += 1;
        let seq = q.seq;
        q.carried += 1;
        q.heap.push(Queued {
            due: sent + link.rtt / 2,
            seq,
            to,
            packet: packet.to_vec(),
        });
        drop(q);
        self.wake.notify_one();
    }
}

/// A uniform sample in [0, 1) from the thread's generator (xorshift,
/// seeded from the clock: loss needs no cryptography).
fn rand_unit() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
                | 1,
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// Counters of what the delay line did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    /// Packets delivered or on their way.
    pub carried: u64,
    /// Packets dropped by a link's loss.
    pub lost: u64,
    /// Packets with no region to go to (not IPv4, or not in the subnet).
    pub unroutable: u64,
}

/// The running delay line: its namespaces, TUN devices and threads.
pub struct DelayLine {
    shared: Arc<Shared>,
    /// `silk-<pid>-<line>-<region>` for every region but [`HOST`] (index 0).
    namespaces: Vec<String>,
    tuns: Vec<Arc<OwnedFd>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for DelayLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelayLine")
            .field("regions", &self.shared.topology.regions)
            .field("namespaces", &self.namespaces)
            .finish_non_exhaustive()
    }
}

impl DelayLine {
    /// Creates a namespace and a TUN per region and starts moving packets,
    /// or says why it cannot (not root, no `ip`, no `/dev/net/tun`).
    pub fn start(topology: Topology) -> Result<Self, String> {
        topology.check()?;
        if !is_root() {
            return Err("not root: namespaces and TUN devices need CAP_NET_ADMIN".into());
        }
        sh(&["ip", "-V"]).map_err(|e| format!("{e} (install iproute2)"))?;
        // Names and the subnet carry this process's id and the line's
        // number in it, so lines of several tests and processes coexist.
        static LINES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LINES.fetch_add(1, Ordering::Relaxed) % 100;
        let pid = std::process::id();
        let subnet = [10, 100 + n as u8, (pid % 250 + 1) as u8];
        let mut line = Self {
            shared: Arc::new(Shared {
                topology,
                subnet,
                queue: Mutex::new(Pending::default()),
                wake: Condvar::new(),
                stop: AtomicBool::new(false),
            }),
            namespaces: Vec::new(),
            tuns: Vec::new(),
            threads: Vec::new(),
        };
        // On an error `line` is dropped, which removes what was made.
        for (r, name) in line.shared.topology.regions.clone().iter().enumerate() {
            let ns = (r > 0).then(|| format!("silk-{pid}-{n}-{name}"));
            if let Some(ns) = &ns {
                sh(&["ip", "netns", "add", ns])?;
                line.namespaces.push(ns.clone());
                sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            }
            // At most 15 bytes: "sk", the pid in hex (at most 7), 2 + 2.
            let dev = format!("sk{pid:x}{n:02x}{r:02x}");
            let fd = open_tun(&dev, ns.as_deref())?;
            line.tuns.push(Arc::new(fd));
            let addr = format!("{}/24", line.address_of(r));
            let ip = |args: &[&str]| -> Result<(), String> {
                let mut full = vec!["ip"];
                if let Some(ns) = &ns {
                    full.extend(["-n", ns.as_str()]);
                }
                full.extend(args);
                sh(&full)
            };
            ip(&["addr", "add", &addr, "dev", &dev])?;
            ip(&["link", "set", &dev, "up"])?;
        }
        for (r, tun) in line.tuns.clone().into_iter().enumerate() {
            let shared = Arc::clone(&line.shared);
            line.threads.push(
                std::thread::Builder::new()
                    .name(format!("delay-line-read-{r}"))
                    .spawn(move || read_loop(&shared, r, &tun))
                    .map_err(|e| format!("cannot start a delay-line thread: {e}"))?,
            );
        }
        let shared = Arc::clone(&line.shared);
        let tuns = line.tuns.clone();
        line.threads.push(
            std::thread::Builder::new()
                .name("delay-line-write".into())
                .spawn(move || write_loop(&shared, &tuns))
                .map_err(|e| format!("cannot start a delay-line thread: {e}"))?,
        );
        Ok(line)
    }

    fn address_of(&self, r: usize) -> Ipv4Addr {
        let [a, b, c] = self.shared.subnet;
        Ipv4Addr::new(a, b, c, (r + 1) as u8)
    }

    /// The address of `region` (its TUN's); `None` for an unknown region.
    pub fn address(&self, region: &str) -> Option<Ipv4Addr> {
        let r = self.shared.topology.index(region);
        (r < self.shared.topology.regions.len()).then(|| self.address_of(r))
    }

    /// The network namespace of `region`; `None` for [`HOST`] (the root
    /// namespace) and unknown regions.
    pub fn namespace(&self, region: &str) -> Option<&str> {
        let r = self.shared.topology.index(region);
        r.checked_sub(1)
            .and_then(|i| self.namespaces.get(i))
            .map(String::as_str)
    }

    /// What to put before a command to run it in `region`:
    /// `ip netns exec <namespace>` (nothing for [`HOST`]).
    pub fn launcher(&self, region: &str) -> Vec<String> {
        self.namespace(region)
            .map(|ns| ["ip", "netns", "exec", ns].map(String::from).to_vec())
            .unwrap_or_default()
    }

    /// Runs `f` on a thread that has entered `region`'s namespace: sockets
    /// it makes belong to that region for good.
    pub fn in_region<T: Send + 'static>(
        &self,
        region: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let ns = self.namespace(region).map(str::to_string);
        std::thread::spawn(move || -> Result<T, String> {
            if let Some(ns) = ns {
                enter_namespace(&ns)?;
            }
            Ok(f())
        })
        .join()
        .map_err(|_| "the thread in the region panicked".to_string())?
    }

    /// What the line has carried so far.
    pub fn carried(&self) -> Carried {
        let q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        Carried {
            carried: q.carried,
            lost: q.lost,
            unroutable: q.unroutable,
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Closing a TUN's last descriptor removes the device; deleting a
        // namespace needs the processes in it gone (the caller's testnet,
        // made after the line, is dropped before it).
        self.tuns.clear();
        for ns in &self.namespaces {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// Moves this thread into the named network namespace.
pub(crate) fn enter_namespace(ns: &str) -> Result<(), String> {
    let path = format!("/var/run/netns/{ns}");
    let file = File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
    // SAFETY: a valid namespace descriptor; setns affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "setns into {ns}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Creates the TUN device `name` (no packet-information header) inside
/// namespace `ns` (the root namespace when `None`), non-blocking.
fn open_tun(name: &str, ns: Option<&str>) -> Result<OwnedFd, String> {
    let name = name.to_string();
    let ns = ns.map(str::to_string);
    std::thread::spawn(move || -> Result<OwnedFd, String> {
        if let Some(ns) = &ns {
            enter_namespace(ns)?;
        }
        let path = c"/dev/net/tun";
        // SAFETY: a NUL-terminated path; the result is checked.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(format!(
                "cannot open /dev/net/tun: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `raw` is a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // struct ifreq: the name (16 bytes), then a union whose first
        // member here is `short ifr_flags`.
        let mut ifreq = [0u8; 40];
        if name.len() >= 16 {
            return Err(format!("TUN name {name:?} is too long"));
        }
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
        ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which
        // `ifreq` is large enough to hold.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, ifreq.as_mut_ptr()) } < 0 {
            return Err(format!(
                "TUNSETIFF {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(fd)
    })
    .join()
    .map_err(|_| "the TUN thread panicked".to_string())?
}

/// Waits up to 100 ms for `fd` to be readable.
fn readable(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 100) > 0 }
}

fn read_loop(shared: &Shared, region: usize, tun: &OwnedFd) {
    let mut buf = vec![0u8; 65_536];
    while !shared.stop.load(Ordering::Relaxed) {
        if !readable(tun) {
            continue;
        }
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            shared.route(region, &buf[..n as usize]);
        }
    }
}

fn write_loop(shared: &Shared, tuns: &[Arc<OwnedFd>]) {
    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        match q.heap.peek() {
            Some(next) if next.due <= now => {
                let Some(p) = q.heap.pop() else { continue };
                drop(q);
                // SAFETY: `p.packet` is readable for its length. A full
                // TUN queue drops the packet, as a full link would.
                unsafe {
                    libc::write(
                        tuns[p.to].as_raw_fd(),
                        p.packet.as_ptr().cast(),
                        p.packet.len(),
                    )
                };
                q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            }
            Some(next) => {
                let wait = next.due - now;
                q = shared
                    .wake
                    .wait_timeout(q, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            None => {
                q = shared
                    .wake
                    .wait_timeout(q, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_wait_out_their_link() {
        if !is_root() {
            eprintln!("skipping: the delay line needs root (namespaces, TUN devices)");
            return;
        }
        let line = DelayLine::start(Topology::new().link(HOST, "far", Link::rtt_ms(120)).link(
            HOST,
            "near",
            Link::rtt_ms(0),
        ))
        .expect("delay line");
        let connect = |region: &str| -> Duration {
            let addr = line.address(region).expect("region");
            let listener = line
                .in_region(region, move || std::net::TcpListener::bind((addr, 0)))
                .expect("region thread")
                .expect("bind");
            let to = listener.local_addr().expect("addr");
            let start = Instant::now();
            let _s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .expect("connect through the delay line");
            start.elapsed()
        };
        // A TCP handshake takes one round trip, which cannot be shorter
        // than the link holds packets for.
        let far = connect("far");
        assert!(
            far >= Duration::from_millis(120),
            "far handshake in {far:?}"
        );
        let _near = connect("near");
        assert!(line.carried().carried >= 4, "{:?}", line.carried());
    }

    #[test]
    fn a_lossy_link_drops_and_a_slow_one_takes_its_time() {
        if !is_root() {
            eprintln!("skipping: the delay line needs root (namespaces, TUN devices)");
            return;
        }
        let line = DelayLine::start(
            Topology::new()
                .link(
                    HOST,
                    "lossy",
                    Link {
                        loss: 1.0,
                        ..Link::default()
                    },
                )
                .link(
                    HOST,
                    "slow",
                    Link {
                        rate_bytes_per_s: Some(100_000),
                        ..Link::default()
                    },
                ),
        )
        .expect("delay line");
        let addr = line.address("lossy").expect("region");
        let listener = line
            .in_region("lossy", move || std::net::TcpListener::bind((addr, 0)))
            .expect("thread")
            .expect("bind");
        let to = listener.local_addr().expect("addr");
        assert!(
            std::net::TcpStream::connect_timeout(&to, Duration::from_millis(500)).is_err(),
            "a connection crossed a link that drops everything"
        );
        assert!(line.carried().lost > 0);

        // 200 kB at 100 kB/s: at least two seconds, whatever the machine.
        let addr = line.address("slow").expect("region");
        let listener = line
            .in_region("slow", move || std::net::TcpListener::bind((addr, 0)))
            .expect("thread")
            .expect("bind");
        let to = listener.local_addr().expect("addr");
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let (mut s, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("read");
            got.len()
        });
        let start = Instant::now();
        {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(to).expect("connect");
            s.write_all(&vec![7u8; 200_000]).expect("write");
        }
        let got = reader.join().expect("reader");
        assert_eq!(got, 200_000);
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "200 kB crossed a 100 kB/s link in {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_topology_refuses_what_it_cannot_build() {
        assert!(Topology::new().region("Bad Name").check().is_err());
        assert!(Topology::new()
            .link(
                HOST,
                "a",
                Link {
                    loss: 1.5,
                    ..Link::default()
                }
            )
            .check()
            .is_err());
        assert!(Topology::new()
            .link(
                HOST,
                "a",
                Link {
                    rate_bytes_per_s: Some(0),
                    ..Link::default()
                }
            )
            .check()
            .is_err());
        let t = Topology::new().link("a", "b", Link::rtt_ms(10));
        assert_eq!(
            t.between(t.index("b"), t.index("a")).rtt,
            Duration::from_millis(10)
        );
        assert_eq!(t.between(0, t.index("a")), Link::default());
    }
}
