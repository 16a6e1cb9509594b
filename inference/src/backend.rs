//! Which Burn backend runs the model: the CPU (`Flex`, pure Rust, always
//! built) or CUDA (the `cuda` feature; the driver is loaded at run time).

use crate::engine::{Engine, EngineConfig};
use crate::error::{InferenceError, Result};
use crate::model::{LoadedModel, ModelSource};
use crate::transformer::WeightLayout;

/// The CPU backend.
pub type Cpu = burn::backend::Flex;

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU backend.
    #[default]
    Cpu,
    /// An NVIDIA GPU by index (needs the `cuda` feature and a driver).
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = InferenceError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    InferenceError::Backend(format!(
                        "unknown device `{other}`: use cpu, cuda or cuda:N"
                    ))
                }),
        }
    }
}

/// Loads `source` on `device` and starts its engine.
pub fn start_engine(source: ModelSource, device: Device, config: EngineConfig) -> Result<Engine> {
    match device {
        Device::Cpu => {
            let model =
                LoadedModel::<Cpu>::load(source, WeightLayout::Packed, &Default::default())?;
            tracing::info!(
                kernels = %model.transformer.kernels(),
                "CPU kernels (set SILK_CPU_KERNELS to pin them)"
            );
            Engine::start(model, config)
        }
        Device::Cuda(index) => start_cuda(source, index, config),
    }
}

#[cfg(feature = "cuda")]
fn start_cuda(source: ModelSource, index: usize, config: EngineConfig) -> Result<Engine> {
    use burn::backend::cuda::{Cuda, CudaDevice};
    // Without a driver burn panics at device creation; say so instead.
    let loaded = std::panic::catch_unwind(|| {
        let device = CudaDevice::new(index);
        LoadedModel::<Cuda>::load(source, WeightLayout::Dense, &device)
    })
    .map_err(|_| {
        InferenceError::Backend(format!(
            "cannot open CUDA device {index}: is the NVIDIA driver (libcuda) installed and a GPU present?"
        ))
    })??;
    Engine::start(loaded, config)
}

#[cfg(not(feature = "cuda"))]
fn start_cuda(_source: ModelSource, _index: usize, _config: EngineConfig) -> Result<Engine> {
    Err(InferenceError::Backend(
        "this build has no CUDA support: rebuild with `--features cuda`".into(),
    ))
}
