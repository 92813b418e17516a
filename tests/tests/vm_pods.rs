//! VM pods through the CRI socket: the pod's containers run in its microVM.

use std::time::Duration;

use isola_proto::cri;
use isola_tests::fixtures::*;
use isola_tests::*;

#[tokio::test]
async fn vm_smoke() {
    let w = World::start().await;
    let mut rt = w.rt().await;
    let pc = w.pod("vmsmoke");
    let pod = run_pod(&mut rt, pc.clone(), "vm").await.expect("vm pod");
    let id = run(
        &mut rt,
        &pod,
        &pc,
        w.sh("c", "echo hi; uname -r; echo err >&2; exit 3"),
    )
    .await;
    let st = wait_exit(&mut rt, &id, Duration::from_secs(60)).await;
    let log = std::path::Path::new(&pc.log_directory).join("c.log");
    let recs = log_records(&log);
    eprintln!("{recs:?}");
    assert_eq!(st.exit_code, 3);
    assert!(
        recs.contains(&("stdout".into(), "F".into(), "hi".into())),
        "{recs:?}"
    );
    teardown(&mut rt, &pod).await;
    w.agent.assert_no_leaks();
    let _ = cri::ContainerState::ContainerExited;
}
