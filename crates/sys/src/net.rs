//! Network set-up inside a sandbox's own network namespace.

use std::io;

/// Adds `addr`/32 to the loopback device under the alias label `label` (`lo:…`), so
/// that programs reach a listener there like any local address.
pub fn loopback_alias(label: &str, addr: std::net::Ipv4Addr) -> io::Result<()> {
    if label.len() >= libc::IFNAMSIZ || !label.starts_with("lo:") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad alias label",
        ));
    }
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let set = |request: libc::c_ulong, ip: std::net::Ipv4Addr| {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(label.bytes()) {
            *dst = src as libc::c_char;
        }
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a sockaddr_in fits in the union's sockaddr member (16 bytes each).
        unsafe {
            std::ptr::copy_nonoverlapping(
                &sin as *const libc::sockaddr_in as *const u8,
                &mut req.ifr_ifru.ifru_addr as *mut libc::sockaddr as *mut u8,
                std::mem::size_of::<libc::sockaddr_in>(),
            );
        }
        // SAFETY: `req` is a valid ifreq naming the alias with an IPv4 address.
        if unsafe { libc::ioctl(fd, request, &req) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let r = set(libc::SIOCSIFADDR, addr)
        .and_then(|()| set(libc::SIOCSIFNETMASK, std::net::Ipv4Addr::BROADCAST));
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(fd) };
    r
}

/// Brings the loopback interface up in the calling process's network namespace.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming "lo"; the kernel fills in the flags.
    let mut rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
    if rc == 0 {
        // SAFETY: reading and writing the flags member of the union the kernel just set.
        unsafe {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        }
        // SAFETY: `req` is a valid ifreq with the new flags.
        rc = unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) };
    }
    let err = io::Error::last_os_error();
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(fd) };
    if rc < 0 {
        Err(err)
    } else {
        Ok(())
    }
}
