//! Seccomp filters for the agent and for the function, compiled with `seccompiler`.
//!
//! Both are deny-lists that answer `EPERM` to system calls a function never needs and that
//! widen the kernel's attack surface or reach outside the sandbox: kernel modules and kexec,
//! BPF and perf, ptrace and cross-process memory access, keyrings, time setting, swap and
//! reboot, io_uring. The function's filter also denies mounting, namespace changes and
//! `chroot`. On x86_64 each denied call is denied through the x32 ABI numbers too.

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};
use std::collections::BTreeMap;

const COMMON_DENY: &[libc::c_long] = &[
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_quotactl,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_syslog,
    libc::SYS_lookup_dcookie,
    libc::SYS_uselib,
    libc::SYS_vhangup,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

const FUNCTION_DENY: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
];

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: libc::c_long = 0x4000_0000;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

fn compile(deny: &[&[libc::c_long]]) -> Result<BpfProgram, seccompiler::Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for list in deny {
        for &nr in *list {
            rules.insert(nr, Vec::new());
            // The same call through the x32 ABI (syscall number | __X32_SYSCALL_BIT), which
            // passes the architecture check of the filter on x86_64.
            #[cfg(target_arch = "x86_64")]
            rules.insert(nr | X32_SYSCALL_BIT, Vec::new());
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        ARCH,
    )?;
    filter.try_into().map_err(seccompiler::Error::Backend)
}

/// The function's filter, compiled ahead of the fork so that the child only installs it.
pub fn function_filter() -> Result<BpfProgram, seccompiler::Error> {
    compile(&[COMMON_DENY, FUNCTION_DENY])
}

/// Install the agent's own filter on the calling thread (call before starting threads).
pub fn apply_agent_filter() -> Result<(), seccompiler::Error> {
    let prog = compile(&[COMMON_DENY])?;
    seccompiler::apply_filter(&prog)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        assert!(!function_filter().unwrap().is_empty());
        assert!(!compile(&[COMMON_DENY]).unwrap().is_empty());
    }
}
