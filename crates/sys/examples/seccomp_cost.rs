//! Prints what compiling and installing the seccomp policy costs on this machine.
use std::time::Instant;
fn main() {
    let t = Instant::now();
    let f = forkbox_sys::seccomp::compile().expect("compile policy");
    println!(
        "compile: {:.3} ms, user filter {} insns",
        t.elapsed().as_secs_f64() * 1000.0,
        f.user.len()
    );
    for with in [false, true] {
        let t = Instant::now();
        for _ in 0..200 {
            // SAFETY: single-threaded example; the child only makes syscalls and exits.
            unsafe {
                let pid = libc::fork();
                if pid == 0 {
                    if with {
                        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                        if forkbox_sys::seccomp::install(&f).is_err() {
                            libc::_exit(1);
                        }
                    }
                    libc::_exit(0);
                }
                let mut st = 0;
                libc::waitpid(pid, &mut st, 0);
            }
        }
        println!(
            "fork+exit, seccomp={with}: {:.3} ms",
            t.elapsed().as_secs_f64() * 1000.0 / 200.0
        );
    }
}
