//! `silk bench mesh` spreads a mesh over several processes and measures it.

use std::process::Command;

#[test]
fn a_mesh_spread_over_processes_is_measured() {
    let data = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_silk"))
        .args(["--data-dir"])
        .arg(data.path())
        .args([
            "bench",
            "mesh",
            "--jobs",
            "0",
            "--sizes",
            "5",
            "--nodes-per-process",
            "2",
        ])
        .output()
        .expect("run silk bench mesh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| 5 |"))
        .unwrap_or_else(|| panic!("no row for 5 nodes in:\n{stdout}"));
    let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
    // nodes, processes, spawn, meshed, settled, connections per node
    // (fewest–most), settled CPU per node, descriptors per node, new
    // worker, all.
    assert_eq!(cells.len(), 10, "{row}");
    assert_eq!(
        cells[1], "3",
        "5 nodes at 2 per process run in 3 processes: {row}"
    );
    let (per_node, range) = cells[5].split_once(" (").expect("a range");
    let per_node: f64 = per_node.parse().expect("connections per node");
    // Every node had all 4 others when the count settled (5 nodes mesh
    // fully, well within the peer budget).
    assert!((3.0..=4.0).contains(&per_node), "{row}");
    let (fewest, most) = range
        .trim_end_matches(')')
        .split_once('–')
        .expect("fewest–most");
    let (fewest, most): (usize, usize) =
        (fewest.parse().expect("fewest"), most.parse().expect("most"));
    assert!(fewest <= most && most <= 4, "{row}");
    let cpu: f64 = cells[6]
        .strip_suffix("% of a core")
        .unwrap_or_else(|| panic!("not a CPU share: {row}"))
        .parse()
        .expect("CPU share");
    assert!((0.0..=200.0).contains(&cpu), "{row}");
    let descriptors: f64 = cells[7].parse().expect("descriptors per node");
    // At least a listener and a connection per node.
    assert!(descriptors >= 2.0, "{row}");
    for cell in [cells[2], cells[3], cells[4], cells[8], cells[9]] {
        let ms = cell
            .strip_suffix(" ms")
            .unwrap_or_else(|| panic!("not a time: {cell} in {row}"));
        ms.parse::<f64>()
            .unwrap_or_else(|_| panic!("not a time: {cell} in {row}"));
    }
}
