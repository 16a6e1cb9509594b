//! silk's dequantization of GGUF blocks against gguf-py's reference
//! implementation (fixtures from `inference/reference/make_quant_fixtures.py`:
//! random blocks with finite scales, dequantized by gguf-py): the dense
//! path's (`gguf::dequantize`) and the blocks the packed kernels hold
//! (`PackedMatrix::from_gguf`, native or rewritten), on every kernel set
//! this CPU runs.

use std::path::Path;

use silk_inference::gguf::{dequantize, TensorType};
use silk_inference::packed::PackedMatrix;
use silk_inference::CpuKernels;

fn check(kind: TensorType, name: &str) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/quant/{name}.json"));
    let text = std::fs::read_to_string(&path).expect("fixture");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let blocks = hex::decode(json["blocks_hex"].as_str().expect("blocks")).expect("hex");
    let want: Vec<f32> = json["values"]
        .as_array()
        .expect("values")
        .iter()
        .map(|v| v.as_f64().expect("f") as f32)
        .collect();
    let close = |what: &str, got: &[f32]| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Both sides multiply the same f16 scales by small integers in
            // f32; allow for a different order of operations only.
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{what}[{i}]: silk {g}, gguf-py {w}"
            );
        }
    };
    let got = dequantize(kind, &blocks, want.len()).expect("supported");
    close(name, &got);
    // The same blocks as one row of a matrix, as the packed kernels hold it.
    let packed = PackedMatrix::from_gguf(kind, 1, want.len(), &blocks).expect("packed");
    for kernels in CpuKernels::available() {
        let mut row = vec![0f32; want.len()];
        packed.dequantize_row(0, &mut row, kernels);
        close(
            &format!("{name} packed as {:?} on {kernels}", packed.format()),
            &row,
        );
    }
}

#[test]
fn q4_0_matches_gguf_py() {
    check(TensorType::Q4_0, "Q4_0");
}

#[test]
fn q4_1_matches_gguf_py() {
    check(TensorType::Q4_1, "Q4_1");
}

#[test]
fn q8_0_matches_gguf_py() {
    check(TensorType::Q8_0, "Q8_0");
}

#[test]
fn q4_k_matches_gguf_py() {
    check(TensorType::Q4K, "Q4_K");
}

#[test]
fn q6_k_matches_gguf_py() {
    check(TensorType::Q6K, "Q6_K");
}

#[test]
fn q5_0_matches_gguf_py() {
    check(TensorType::Q5_0, "Q5_0");
}

#[test]
fn q5_1_matches_gguf_py() {
    check(TensorType::Q5_1, "Q5_1");
}

#[test]
fn q5_k_matches_gguf_py() {
    check(TensorType::Q5K, "Q5_K");
}
