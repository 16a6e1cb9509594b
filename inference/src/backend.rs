//! Which Burn backend runs the model: the CPU (`Flex`, pure Rust, always
//! built) or CUDA (the `cuda` feature; the driver is loaded at run time).

use crate::engine::{Engine, EngineConfig};
use crate::error::{InferenceError, Result};
use crate::model::{LoadedModel, ModelSource};
use crate::transformer::{Precision, WeightLayout};
use crate::CpuKernels;

/// The CPU backend.
pub type Cpu = burn::backend::Flex;

/// What every backend implements (Burn's), for [`OnBackend`] implementors.
pub use burn::prelude::Backend;

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

/// Work to run on a backend chosen at run time (Rust closures cannot be
/// generic over the backend type; this trait is that closure).
pub trait OnBackend {
    /// What the work returns.
    type Output;
    /// Runs on backend `B`'s `device`.
    fn run<B: Backend>(self, device: &B::Device) -> Result<Self::Output>;
}

/// Runs `job` on `device`: the CPU backend, or CUDA with the `cuda` feature.
pub fn on_device<J: OnBackend>(device: Device, job: J) -> Result<J::Output> {
    match device {
        Device::Cpu => job.run::<Cpu>(&Default::default()),
        Device::Cuda(index) => on_cuda(index, job),
    }
}

#[cfg(feature = "cuda")]
fn on_cuda<J: OnBackend>(index: usize, job: J) -> Result<J::Output> {
    use burn::backend::cuda::{Cuda, CudaDevice};
    let device = std::panic::catch_unwind(|| CudaDevice::new(index)).map_err(|_| no_cuda(index))?;
    job.run::<Cuda>(&device)
}

#[cfg(not(feature = "cuda"))]
fn on_cuda<J: OnBackend>(_index: usize, _job: J) -> Result<J::Output> {
    Err(no_cuda_build())
}

#[cfg_attr(feature = "cuda", allow(dead_code))]
fn no_cuda_build() -> InferenceError {
    InferenceError::Backend("this build has no CUDA support: rebuild with `--features cuda`".into())
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn no_cuda(index: usize) -> InferenceError {
    InferenceError::Backend(format!(
        "cannot open CUDA device {index}: is the NVIDIA driver (libcuda) installed and a GPU present?"
    ))
}

/// Loads `source` on `device` in `precision` and starts its engine. On the
/// CPU, f32 takes the packed layout (what a CPU worker serves) and bf16 the
/// dense one (the GPU's arithmetic, for rehearsing it).
pub fn start_engine(
    source: ModelSource,
    device: Device,
    precision: Precision,
    config: EngineConfig,
) -> Result<Engine> {
    match device {
        Device::Cpu => {
            let layout = match precision {
                Precision::F32 => WeightLayout::Packed,
                Precision::Bf16 => WeightLayout::Dense,
            };
            let model = LoadedModel::<Cpu>::load_with(
                source,
                layout,
                CpuKernels::from_env()?,
                precision,
                &Default::default(),
            )?;
            tracing::info!(
                kernels = %model.transformer.kernels(),
                %precision,
                "CPU kernels (set SILK_CPU_KERNELS to pin them)"
            );
            Engine::start(model, config)
        }
        Device::Cuda(index) => start_cuda(source, index, precision, config),
    }
}

#[cfg(feature = "cuda")]
fn start_cuda(
    source: ModelSource,
    index: usize,
    precision: Precision,
    config: EngineConfig,
) -> Result<Engine> {
    use burn::backend::cuda::{Cuda, CudaDevice};
    // Without a driver burn panics at device creation; say so instead.
    let loaded = std::panic::catch_unwind(|| {
        let device = CudaDevice::new(index);
        LoadedModel::<Cuda>::load_with(
            source,
            WeightLayout::Dense,
            CpuKernels::from_env()?,
            precision,
            &device,
        )
    })
    .map_err(|_| no_cuda(index))??;
    Engine::start(loaded, config)
}

#[cfg(not(feature = "cuda"))]
fn start_cuda(
    _source: ModelSource,
    _index: usize,
    _precision: Precision,
    _config: EngineConfig,
) -> Result<Engine> {
    Err(no_cuda_build())
}
