//! NAT for tests: sites in network namespaces, some behind their own
//! nftables masquerade NAT, joined by a core router.
//!
//! ```text
//!             host (this process: reaches every node's API)
//!               |
//!  public site --- core router --- NAT router --- site behind NAT
//!                       |
//!                       +--------- NAT router --- site behind NAT
//! ```
//!
//! Every link is a veth pair. A public site's address is routable from
//! every other site. A site behind NAT has a private address
//! (`192.168.x.2`); its NAT router masquerades what it sends out behind the
//! router's public address and drops what comes in unless it belongs to a
//! connection the site opened (or comes from the host, so the test can
//! reach the node's API), silently: the behaviour of a home router. Two sites
//! behind different NATs can then meet only through a relay, or by hole
//! punching (both dial at once, each NAT taking the other's packets as the
//! answer to its own). [`NatLab::cut`] drops traffic between two sites'
//! public faces at the core, so hole punching between them fails.
//!
//! Needs root (CAP_NET_ADMIN), `ip` from iproute2 and `nft` from nftables;
//! [`NatLab::start`] says which is missing. Everything it creates carries
//! this process's id in its name and is removed when the lab is dropped.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::delay_line::{check_name, is_root, sh};

/// Where a site sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On the core network, with an address every site can reach.
    Public,
    /// Behind its own masquerading NAT router.
    BehindNat,
}

#[derive(Debug)]
struct Site {
    name: String,
    placement: Placement,
    namespace: String,
    /// The site's own address.
    address: Ipv4Addr,
    /// The address other sites see it at (the NAT router's, behind NAT).
    public: Ipv4Addr,
}

/// A running lab; dropping it removes every namespace and link.
#[derive(Debug)]
pub struct NatLab {
    sites: Vec<Site>,
    core: String,
    /// Namespaces to delete, the core last.
    namespaces: Vec<String>,
}

/// Most sites in one lab.
const MAX_SITES: usize = 4;

impl NatLab {
    /// Builds the lab: one namespace per site, one per NAT router, and the
    /// core. Site names are 1 to 8 lowercase letters or digits.
    pub fn start(sites: &[(&str, Placement)]) -> Result<Self, String> {
        if !is_root() {
            return Err("not root: network namespaces need CAP_NET_ADMIN".into());
        }
        sh(&["ip", "-V"]).map_err(|e| format!("{e} (install iproute2)"))?;
        sh(&["nft", "--version"]).map_err(|e| format!("{e} (install nftables)"))?;
        if sites.is_empty() || sites.len() > MAX_SITES {
            return Err(format!("1 to {MAX_SITES} sites, got {}", sites.len()));
        }
        for (name, _) in sites {
            check_name("site", name)?;
        }
        // Subnets carry the process id and the lab's number, so labs of
        // several tests and processes coexist: link i of lab k is
        // 10.77.(5k + i).0/24 (link 0 is the host's), and a NAT's private
        // side 192.168.(5k + i).0/24.
        static LABS: AtomicU32 = AtomicU32::new(0);
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let k = ((pid + n) % 50) as u8;
        let net = |i: usize| 5 * k + i as u8;
        let prefix = format!("silknat-{pid}-{n}");
        let core = format!("{prefix}-core");
        let mut lab = Self {
            sites: Vec::new(),
            core: core.clone(),
            namespaces: Vec::new(),
        };
        // On an error `lab` is dropped, which removes what was made.
        lab.add_namespace(&core)?;
        ns_sysctl(&core)?;
        // The host's link: the host end's name is unique in the root namespace.
        let host_dev = format!("sn{pid:x}{:02x}", n % 256);
        sh(&[
            "ip", "link", "add", &host_dev, "type", "veth", "peer", "name", "h0", "netns", &core,
        ])?;
        let host_addr = Ipv4Addr::new(10, 77, net(0), 2);
        let core_host_side = Ipv4Addr::new(10, 77, net(0), 1);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_addr}/24"),
            "dev",
            &host_dev,
        ])?;
        sh(&["ip", "link", "set", &host_dev, "up"])?;
        ip(
            &core,
            &["addr", "add", &format!("{core_host_side}/24"), "dev", "h0"],
        )?;
        ip(&core, &["link", "set", "h0", "up"])?;

        for (i, (name, placement)) in sites.iter().enumerate() {
            let i = i + 1;
            let public_net = net(i);
            let core_side = Ipv4Addr::new(10, 77, public_net, 1);
            let far_side = Ipv4Addr::new(10, 77, public_net, 2);
            let namespace = format!("{prefix}-{name}");
            lab.add_namespace(&namespace)?;
            let core_dev = format!("c{i}");
            // The far end of the core link: the site itself, or its NAT.
            let outer = match placement {
                Placement::Public => namespace.clone(),
                Placement::BehindNat => {
                    let nat = format!("{prefix}-nat{i}");
                    lab.add_namespace(&nat)?;
                    ns_sysctl(&nat)?;
                    nat
                }
            };
            veth(&core, &core_dev, &outer, "wan")?;
            ip(
                &core,
                &["addr", "add", &format!("{core_side}/24"), "dev", &core_dev],
            )?;
            ip(
                &outer,
                &["addr", "add", &format!("{far_side}/24"), "dev", "wan"],
            )?;
            ip(
                &outer,
                &["route", "add", "default", "via", &core_side.to_string()],
            )?;
            let address = match placement {
                Placement::Public => far_side,
                Placement::BehindNat => {
                    let lan = format!("192.168.{public_net}.0/24");
                    let gateway = Ipv4Addr::new(192, 168, public_net, 1);
                    let inside = Ipv4Addr::new(192, 168, public_net, 2);
                    veth(&outer, "lan", &namespace, "wan")?;
                    ip(
                        &outer,
                        &["addr", "add", &format!("{gateway}/24"), "dev", "lan"],
                    )?;
                    ip(
                        &namespace,
                        &["addr", "add", &format!("{inside}/24"), "dev", "wan"],
                    )?;
                    ip(
                        &namespace,
                        &["route", "add", "default", "via", &gateway.to_string()],
                    )?;
                    // The core routes the private side too, so the host
                    // reaches the node's API; the NAT's guard keeps
                    // everyone else out.
                    ip(&core, &["route", "add", &lan, "via", &far_side.to_string()])?;
                    sh(&[
                        "ip",
                        "route",
                        "add",
                        &lan,
                        "via",
                        &core_host_side.to_string(),
                    ])?;
                    masquerade(&outer, &lan, host_addr)?;
                    inside
                }
            };
            sh(&[
                "ip",
                "route",
                "add",
                &format!("10.77.{public_net}.0/24"),
                "via",
                &core_host_side.to_string(),
            ])?;
            lab.sites.push(Site {
                name: name.to_string(),
                placement: *placement,
                namespace,
                address,
                public: far_side,
            });
        }
        // The core's own filter, where `cut` adds its rules.
        nft(&core, "add table ip lab")?;
        nft(
            &core,
            "add chain ip lab cuts { type filter hook forward priority 0 ; policy accept ; }",
        )?;
        Ok(lab)
    }

    fn add_namespace(&mut self, ns: &str) -> Result<(), String> {
        sh(&["ip", "netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        ip(ns, &["link", "set", "lo", "up"])
    }

    fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name == name)
    }

    /// The address a node at `site` listens on (a private one behind NAT).
    pub fn address(&self, site: &str) -> Option<Ipv4Addr> {
        self.site(site).map(|s| s.address)
    }

    /// The address other sites see `site`'s traffic come from: its NAT
    /// router's public one, or its own.
    pub fn public_address(&self, site: &str) -> Option<Ipv4Addr> {
        self.site(site).map(|s| s.public)
    }

    /// Whether `site` is behind NAT.
    pub fn placement(&self, site: &str) -> Option<Placement> {
        self.site(site).map(|s| s.placement)
    }

    /// What to put before a command to run it at `site`: `ip netns exec
    /// <namespace>`.
    pub fn launcher(&self, site: &str) -> Vec<String> {
        self.site(site)
            .map(|s| {
                ["ip", "netns", "exec", s.namespace.as_str()]
                    .map(String::from)
                    .to_vec()
            })
            .unwrap_or_default()
    }

    /// Drops every packet between the public faces of sites `a` and `b`
    /// at the core, both ways: they can still meet through a third site
    /// (a relay), but not directly.
    pub fn cut(&self, a: &str, b: &str) -> Result<(), String> {
        let (Some(a), Some(b)) = (self.site(a), self.site(b)) else {
            return Err(format!("no site {a:?} or {b:?}"));
        };
        for (from, to) in [(a.public, b.public), (b.public, a.public)] {
            nft(
                &self.core,
                &format!("add rule ip lab cuts ip saddr {from} ip daddr {to} drop"),
            )?;
        }
        Ok(())
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it, and with them
        // their peers (the host's end and its routes too). The caller's
        // processes in the sites, started after the lab, are gone first.
        for ns in self.namespaces.iter().rev() {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

fn ip(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut full = vec!["ip", "-n", ns];
    full.extend(args);
    sh(&full)
}

fn nft(ns: &str, command: &str) -> Result<(), String> {
    sh(&["ip", "netns", "exec", ns, "nft", command])
}

/// A veth pair with one end in each namespace.
fn veth(ns_a: &str, dev_a: &str, ns_b: &str, dev_b: &str) -> Result<(), String> {
    sh(&[
        "ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns",
        ns_b,
    ])?;
    ip(ns_a, &["link", "set", dev_a, "up"])?;
    ip(ns_b, &["link", "set", dev_b, "up"])
}

/// Lets a namespace forward packets (a router).
fn ns_sysctl(ns: &str) -> Result<(), String> {
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ])
}

/// A home router's rules on `ns`: what `lan` sends out leaves with the
/// router's address; what comes in must answer a connection from inside
/// (or come from the host running the test), and anything else is
/// dropped without an answer.
fn masquerade(ns: &str, lan: &str, host: Ipv4Addr) -> Result<(), String> {
    for command in [
        "add table ip nat".to_string(),
        "add chain ip nat out { type nat hook postrouting priority 100 ; }".to_string(),
        format!("add rule ip nat out oifname \"wan\" ip saddr {lan} ip daddr != {host} masquerade"),
        "add table ip guard".to_string(),
        "add chain ip guard in { type filter hook forward priority 0 ; policy accept ; }"
            .to_string(),
        "add rule ip guard in oifname \"lan\" ct state established,related accept".to_string(),
        format!("add rule ip guard in oifname \"lan\" ip saddr {host} accept"),
        "add rule ip guard in oifname \"lan\" drop".to_string(),
        // Like a home router, it ignores unsolicited packets to itself
        // rather than refusing them: a TCP reset would abort the peer's
        // half of a simultaneous open (hole punching) before this side's
        // own dial opened the way.
        "add chain ip guard self { type filter hook input priority 0 ; policy accept ; }"
            .to_string(),
        "add rule ip guard self iifname \"wan\" ct state established,related accept".to_string(),
        "add rule ip guard self iifname \"wan\" drop".to_string(),
    ] {
        nft(ns, &command)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    /// A TCP connection from `from` to `to`'s `port`, both inside the lab:
    /// the address the listener saw it come from, or why it failed.
    fn connect(lab: &NatLab, from: &str, to: &str, port: u16) -> Result<Ipv4Addr, String> {
        let target = lab.address(to).ok_or("no such site")?;
        let listen_ns = lab.site(to).ok_or("no such site")?.namespace.clone();
        let dial_ns = lab.site(from).ok_or("no such site")?.namespace.clone();
        let listener = std::thread::spawn(move || -> Result<Ipv4Addr, String> {
            crate::delay_line::enter_namespace(&listen_ns)?;
            let l = std::net::TcpListener::bind((target, port)).map_err(|e| e.to_string())?;
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            loop {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.write_all(b"x");
                        return match peer.ip() {
                            std::net::IpAddr::V4(a) => Ok(a),
                            other => Err(format!("an IPv6 peer {other}")),
                        };
                    }
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(format!("nothing arrived: {e}")),
                }
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        let dialled = std::thread::spawn(move || -> Result<(), String> {
            crate::delay_line::enter_namespace(&dial_ns)?;
            let mut s = std::net::TcpStream::connect_timeout(
                &(target, port).into(),
                Duration::from_secs(2),
            )
            .map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).map_err(|e| e.to_string())
        })
        .join()
        .map_err(|_| "the dialling thread panicked".to_string())?;
        let seen = listener
            .join()
            .map_err(|_| "the listening thread panicked".to_string())?;
        dialled.and(seen)
    }

    #[test]
    fn a_nat_lets_connections_out_and_none_in() {
        if !is_root() {
            eprintln!("skipping: not root (network namespaces need it)");
            return;
        }
        let lab = NatLab::start(&[
            ("pub", Placement::Public),
            ("home", Placement::BehindNat),
            ("office", Placement::BehindNat),
        ])
        .expect("the lab starts");
        // Out: the public site sees the NAT router's address, not the
        // private one.
        let seen = connect(&lab, "home", "pub", 47001).expect("home reaches pub");
        assert_eq!(Some(seen), lab.public_address("home"));
        assert_ne!(Some(seen), lab.address("home"));
        // In: nobody outside reaches a site behind NAT, by its private
        // address or its router's.
        assert!(connect(&lab, "pub", "home", 47002).is_err());
        assert!(connect(&lab, "office", "home", 47003).is_err());
        // A cut between two public faces stops what got through before.
        assert!(connect(&lab, "office", "pub", 47004).is_ok());
        lab.cut("office", "pub").expect("the cut is made");
        assert!(connect(&lab, "office", "pub", 47005).is_err());
        assert!(connect(&lab, "home", "pub", 47006).is_ok());
        let namespaces = lab.namespaces.clone();
        drop(lab);
        let left = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        let left = String::from_utf8_lossy(&left.stdout);
        for ns in namespaces {
            assert!(!left.contains(&ns), "{ns} is still there");
        }
    }
}
