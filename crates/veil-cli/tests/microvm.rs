//! Functions in QEMU microVMs, end to end on real components: Debian's QEMU (TCG here: this
//! machine's /dev/kvm does not run standard guests), Debian's cloud kernel with the veil guest
//! initrd (veil-agent as `/init`), a real docker-registry, skopeo and cosign, the embedded key
//! broker. Needs root, qemu-system-x86, the extracted guest kernel, docker-registry, skopeo and
//! cosign (`make test` installs them).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use veil_cli::backend::{BackendChoice, MicroVmOptions};
use veil_cli::{images, Platform, UpOptions};
use veil_gateway::DeployRequest;
use veil_sandbox::microvm::Accel;
use veil_testkit::{skopeo, TestRegistry};

/// QEMUs whose command line names `dir` (a platform's state directory).
fn qemus_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    c.contains("qemu-system") && c.contains(&needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

async fn up_microvm(state: &Path) -> Platform {
    let mut opts = UpOptions::defaults(state.to_path_buf());
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.pool_size = 1;
    opts.cold_start_timeout = Duration::from_secs(120);
    opts.backend = BackendChoice::MicroVm(MicroVmOptions {
        accel: Accel::Tcg,
        ..MicroVmOptions::default()
    });
    Platform::start(opts).await.unwrap()
}

async fn call(p: &Platform, name: &str, path: &str) -> (u16, String, reqwest::header::HeaderMap) {
    let r = p
        .admin_client()
        .unwrap()
        .invoke(name, "GET", path, Vec::new(), &BTreeMap::new())
        .await
        .unwrap();
    (
        r.status,
        String::from_utf8_lossy(&r.body).into_owned(),
        r.headers,
    )
}

/// A plain image and an encrypted, cosign-signed one (keys and policy from the broker), both
/// pushed by skopeo to a real registry, run in microVMs cold and warm; after delete and stop no
/// QEMU is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_run_in_microvms_cold_and_warm() {
    use veil_image::crypt::PrivateKey;
    let reg = TestRegistry::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    images::write_example(&ctx).unwrap();
    let mut spec = images::example_spec(&ctx);
    spec.entrypoint = vec!["/hello".into()];
    let image = veil_image::build::build_image(&spec).unwrap();
    let layout_dir = tmp.path().join("layout");
    veil_image::layout::OciLayout::create(&layout_dir)
        .unwrap()
        .write_image(&image, "v1")
        .unwrap();
    let plain = format!("{}/vm/hello:v1", reg.host());
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout_dir.display()),
        &format!("docker://{plain}"),
    ])
    .unwrap();
    let key = PrivateKey::generate_p256();
    let pub_pem = tmp.path().join("pub.pem");
    std::fs::write(&pub_pem, key.public_key().to_pem().unwrap()).unwrap();
    let secret = format!("{}/vm/secret:v1", reg.host());
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--encryption-key",
        &format!("jwe:{}", pub_pem.display()),
        &format!("oci:{}:v1", layout_dir.display()),
        &format!("docker://{secret}"),
    ])
    .unwrap();
    veil_testkit::cosign_key_pair(tmp.path(), "signer", "pw").unwrap();
    veil_testkit::cosign(
        &[
            "sign",
            "--key",
            tmp.path().join("signer.key").to_str().unwrap(),
            "--tlog-upload=false",
            "-y",
            "--allow-insecure-registry",
            "--allow-http-registry",
            &secret,
        ],
        &[("COSIGN_PASSWORD", "pw")],
    )
    .unwrap();

    let state = tmp.path().join("state");
    let p = up_microvm(&state).await;
    assert_eq!(p.gateway.node().backend_label(), "microvm/tcg");
    let kbs = p.kbs.clone().unwrap();
    kbs.set_resource("default/image-key/vm", key.to_pem().unwrap().as_bytes())
        .unwrap();
    kbs.set_resource(
        "default/cosign/signer",
        &std::fs::read(tmp.path().join("signer.pub")).unwrap(),
    )
    .unwrap();
    kbs.set_resource(
        "default/policy/vm",
        br#"{"default":[{"type":"sigstoreSigned","keyPath":"kbs:///default/cosign/signer",
            "signedIdentity":{"type":"matchRepository"}}]}"#,
    )
    .unwrap();
    kbs.set_resource("default/app/greeting", b"from-the-broker")
        .unwrap();
    let admin = p.admin_client().unwrap();
    admin
        .deploy("plain", &DeployRequest::new(&plain))
        .await
        .unwrap();
    let mut req = DeployRequest::new(&secret);
    req.decryption_keys = vec!["kbs:///default/image-key/vm".into()];
    req.signature_policy = Some("kbs:///default/policy/vm".into());
    req.secrets
        .insert("GREETING".into(), "kbs:///default/app/greeting".into());
    req.allow_insecure_software_tee = true;
    admin.deploy("secret", &req).await.unwrap();

    for name in ["plain", "secret"] {
        let (status, body, headers) = call(&p, name, "/hi").await;
        assert_eq!(status, 200, "{name}: {body}");
        assert!(body.starts_with("Hello from veil! GET /hi"), "{body}");
        let phases = headers["x-veil-cold-start"].to_str().unwrap().to_string();
        assert!(phases.contains("backend=microvm/tcg"), "{phases}");
        let (status, body, headers) = call(&p, name, "/hi").await;
        assert_eq!(status, 200, "{name}: {body}");
        assert!(!headers.contains_key("x-veil-cold-start"), "warm");
    }
    let (status, body, _) = call(&p, "secret", "/env/GREETING").await;
    assert_eq!((status, body.as_str()), (200, "GREETING=from-the-broker\n"));
    // Function output reached the node over the channel's log substream.
    let logs = format!("{:?}", admin.logs("plain", 200).await.unwrap());
    assert!(logs.contains("hello: listening on port 8080"), "{logs}");
    // The node's listing names the backend.
    let sbs = admin.sandboxes().await.unwrap();
    assert!(
        sbs.iter()
            .all(|s| s["backend"] == "microvm" && s["accelerator"] == "tcg"),
        "{sbs:?}"
    );
    assert!(!qemus_under(&state).is_empty());

    for name in ["plain", "secret"] {
        admin.delete(name).await.unwrap();
    }
    p.stop().await.unwrap();
    let left = qemus_under(&state);
    assert!(left.is_empty(), "QEMU left behind: {left:?}");
    let vms = std::fs::read_dir(state.join("vms")).unwrap().count();
    assert_eq!(vms, 0, "sandbox directories left behind");
}

/// A VMM that dies mid-request: the request fails with a clear error, the instance goes, and
/// the next request starts a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_dies_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let p = up_microvm(&state).await;
    let ctx = tmp.path().join("ctx");
    images::write_example(&ctx).unwrap();
    let mut spec = images::example_spec(&ctx);
    spec.entrypoint = vec!["/hello".into()];
    let image = veil_image::build::build_image(&spec).unwrap();
    let reference: veil_image::Reference = "local/vmhello:v1".parse().unwrap();
    let target = images::push_target(&reference, &p.url()).unwrap();
    images::push(&p.registry_client().unwrap(), &image, &target)
        .await
        .unwrap();
    let admin = p.admin_client().unwrap();
    admin
        .deploy("vmhello", &DeployRequest::new("local/vmhello:v1"))
        .await
        .unwrap();
    let (status, body, headers) = call(&p, "vmhello", "/").await;
    assert_eq!(status, 200, "{body}");
    let first = headers["x-veil-instance"].to_str().unwrap().to_string();
    let qemu_of_first = qemus_under(&state.join("vms").join(&first));
    assert_eq!(qemu_of_first.len(), 1);

    // A request in flight when its VMM is killed.
    let slow = {
        let admin = admin.clone();
        tokio::spawn(async move {
            admin
                .invoke(
                    "vmhello",
                    "GET",
                    "/sleep/5000/",
                    Vec::new(),
                    &BTreeMap::new(),
                )
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Kill the VMM from outside, as a crash would.
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &qemu_of_first[0].to_string()])
        .status()
        .unwrap()
        .success());
    let r = slow.await.unwrap();
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 502, "{body}");
    assert!(body.contains("INSTANCE_FAILED"), "{body}");

    let (status, body, headers) = call(&p, "vmhello", "/").await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(headers["x-veil-instance"].to_str().unwrap(), first);
    admin.delete("vmhello").await.unwrap();
    p.stop().await.unwrap();
    assert!(qemus_under(&state).is_empty());
}

fn guest(out: &Path) -> veil_guest::GuestArtifacts {
    veil_guest::build(&veil_guest::GuestConfig::new(
        veil_node::find_agent(),
        out.to_path_buf(),
    ))
    .unwrap()
}

/// A missing kernel, initrd or QEMU: the backend says what to run or install.
#[tokio::test]
async fn missing_guest_or_qemu_says_what_to_do() {
    use veil_sandbox::microvm::{MicroVmBackend, MicroVmConfig};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = MicroVmConfig::new(
        tmp.path().join("vmlinuz"),
        tmp.path().join("initrd.img"),
        String::new(),
        tmp.path().join("vms"),
    );
    let e = MicroVmBackend::start(cfg.clone())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("guest kernel") && e.contains("veil guest build"),
        "{e}"
    );
    let g = guest(&tmp.path().join("guest"));
    let mut cfg = MicroVmConfig::new(
        g.kernel.path,
        g.initrd.path,
        g.cmdline,
        tmp.path().join("vms"),
    );
    cfg.qemu = "/nonexistent/qemu-system-x86_64".into();
    let e = MicroVmBackend::start(cfg).await.err().unwrap().to_string();
    assert!(e.contains("qemu-system-x86"), "{e}");
}

/// The accelerator is chosen by booting a probe guest under KVM with a time bound: where KVM
/// hangs standard guests (this machine), the probe gives up and the backend uses TCG; either
/// way the backend then boots sandboxes with what it chose and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kvm_probe_is_bounded_and_the_choice_boots() {
    use veil_sandbox::microvm::{MicroVmBackend, MicroVmConfig};
    use veil_sandbox::Backend;
    let tmp = tempfile::tempdir().unwrap();
    let g = guest(&tmp.path().join("guest"));
    let vms = tmp.path().join("vms");
    let mut cfg = MicroVmConfig::new(g.kernel.path, g.initrd.path, g.cmdline, vms.clone());
    cfg.accel = Accel::Auto;
    cfg.kvm_probe_timeout = Duration::from_secs(8);
    cfg.tcg_append = veil_guest::tcg_clock_param();
    let backend = MicroVmBackend::start(cfg).await.unwrap();
    let accel = backend.kind().accelerator.unwrap();
    assert!(accel == "kvm" || accel == "tcg", "{accel}");
    eprintln!("accelerator chosen by the probe: {accel}");
    if !Path::new("/dev/kvm").exists() {
        assert_eq!(accel, "tcg");
    }
    assert!(
        qemus_under(&vms).is_empty(),
        "the probe VM was left running"
    );
    let sb = backend
        .create(veil_sandbox::SandboxSpec {
            id: "0123456789abcdef".into(),
            memory_bytes: 256 << 20,
            cpu_millis: 1000,
            pids_max: 256,
            rootfs_bytes: 64 << 20,
        })
        .await
        .unwrap();
    assert!(!sb.handle.pids().is_empty());
    sb.handle.destroy().await.unwrap();
    assert!(
        sb.handle.leftovers().is_empty(),
        "{:?}",
        sb.handle.leftovers()
    );
    assert!(qemus_under(&vms).is_empty());
}

/// A guest that does not reach the agent within the boot timeout (here a timeout far shorter
/// than a TCG boot): the boot fails with a clear error, QEMU is killed and nothing is left —
/// no process, no socket, no directory. The node's pool then retries, as for a VM that died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_reaches_the_agent_is_killed_at_the_boot_timeout() {
    use veil_sandbox::microvm::{MicroVmBackend, MicroVmConfig};
    use veil_sandbox::Backend;
    let tmp = tempfile::tempdir().unwrap();
    let g = guest(&tmp.path().join("guest"));
    let vms = tmp.path().join("vms");
    let mut cfg = MicroVmConfig::new(g.kernel.path, g.initrd.path, g.cmdline, vms.clone());
    cfg.accel = Accel::Tcg;
    cfg.tcg_append = veil_guest::tcg_clock_param();
    cfg.boot_timeout = Duration::from_millis(300);
    let backend = MicroVmBackend::start(cfg).await.unwrap();
    let started = std::time::Instant::now();
    let e = backend
        .create(veil_sandbox::SandboxSpec {
            id: "00000000deadbeef".into(),
            memory_bytes: 256 << 20,
            cpu_millis: 1000,
            pids_max: 256,
            rootfs_bytes: 64 << 20,
        })
        .await
        .err()
        .expect("a 300 ms boot timeout cannot be met under TCG")
        .to_string();
    assert!(
        e.contains("did not open its channel in time") && e.contains("00000000deadbeef"),
        "{e}"
    );
    // Bounded: the timeout plus the time to read QEMU's last words and kill it.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(qemus_under(&vms).is_empty(), "QEMU left running");
    assert!(
        !vms.join("00000000deadbeef").exists(),
        "the VM's directory (sockets, pid file) was left"
    );
}

/// Tenant-attested pools on the microVM backend too: a microVM attested to tenant `default`
/// ahead of demand takes the cold start, with no attestation on its path, and serves the
/// secret its broker released against the stated assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_attested_microvms() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let p = up_microvm(&state).await;
    p.kbs
        .clone()
        .unwrap()
        .set_resource("default/app/greeting", b"hello-vm")
        .unwrap();
    let admin = p.admin_client().unwrap();
    admin
        .set_tenant_pool(
            "default",
            &veil_gateway::TenantPoolRequest {
                size: 1,
                kbs_url: None,
                allow_insecure_software_tee: true,
            },
        )
        .await
        .unwrap();
    let ctx = tmp.path().join("ctx");
    images::write_example(&ctx).unwrap();
    let image = veil_image::build::build_image(&images::example_spec(&ctx)).unwrap();
    let reference: veil_image::Reference = "local/vmpool:v1".parse().unwrap();
    let target = images::push_target(&reference, &p.url()).unwrap();
    images::push(&p.registry_client().unwrap(), &image, &target)
        .await
        .unwrap();
    for _ in 0..1200 {
        if admin
            .tenant_pools()
            .await
            .unwrap()
            .first()
            .is_some_and(|t| t.ready == 1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(admin.tenant_pools().await.unwrap()[0].ready, 1);
    let mut req = DeployRequest::new("local/vmpool:v1");
    req.secrets
        .insert("GREETING".into(), "kbs:///default/app/greeting".into());
    req.allow_insecure_software_tee = true;
    admin.deploy("vmpool", &req).await.unwrap();
    let (status, body, headers) = call(&p, "vmpool", "/env/GREETING").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "GREETING=hello-vm\n");
    let phases = headers["x-veil-cold-start"].to_str().unwrap().to_string();
    assert!(
        phases.contains("pool=tenant-attested")
            && phases.contains("attest=0.0")
            && phases.contains("backend=microvm/tcg"),
        "{phases}"
    );
    assert_eq!(headers["x-veil-sandbox-tenant"], "default");
    admin.delete("vmpool").await.unwrap();
    p.stop().await.unwrap();
    assert!(qemus_under(&state).is_empty());
}
