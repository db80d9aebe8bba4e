//! Random-subspace training (Li et al. 2018): theta = theta0 + P z with only z
//! trained. P is drawn from a seed, so a checkpoint holds z alone; three forms
//! trade memory for speed: dense Gaussian, sparse, and Fastfood.

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::nn::data::normals;
use crate::nn::kinds::ProjectionKind;
use crate::nn::model::{Param, Role};

/// A map from d subspace coordinates to D parameters.
pub enum Projection {
    /// D x d, columns of unit norm.
    Dense(Tensor),
    /// Nonzero entries (row, column, value); columns of unit norm.
    Sparse {
        rows: Tensor,
        cols: Tensor,
        values: Tensor,
        full: i64,
    },
    /// V z = (H G Pi H B [z; 0])[:D] / (sqrt(L sum G^2) sqrt(D / L)), H the L x L Hadamard
    /// matrix (unnormalized), L the power of two at or above max(D, d).
    Fastfood {
        b: Tensor,
        pi: Tensor,
        g: Tensor,
        scale: f64,
        full: i64,
        padded: i64,
    },
}

/// Nonzero entries per column of the sparse form: about sqrt(D).
fn sparse_per_column(full: i64) -> i64 {
    ((full as f64).sqrt().round() as i64).clamp(1, full)
}

impl Projection {
    /// The bytes the projection occupies on its device, known before it is drawn.
    pub fn bytes(kind: ProjectionKind, full: i64, dim: i64) -> u64 {
        let (full, dim) = (full as u64, dim as u64);
        match kind {
            ProjectionKind::Dense => 4 * full * dim,
            ProjectionKind::Sparse => (8 + 8 + 4) * sparse_per_column(full as i64) as u64 * dim,
            ProjectionKind::Fastfood => (4 + 8 + 4) * full.max(dim).next_power_of_two(),
        }
    }

    /// Draws a projection from `seed`; the same on every device.
    pub fn new(kind: ProjectionKind, full: i64, dim: i64, seed: u64, device: Device) -> Projection {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5ab5_9ace_0000_0001);
        match kind {
            ProjectionKind::Dense => {
                let p = Tensor::from_slice(&normals(&mut rng, (full * dim) as usize))
                    .view([full, dim])
                    .to_device(device);
                let norms = p.square().sum_dim_intlist([0i64].as_slice(), true, Kind::Float).sqrt();
                Projection::Dense(p / norms)
            }
            ProjectionKind::Sparse => {
                let k = sparse_per_column(full);
                let mut rows = Vec::with_capacity((k * dim) as usize);
                let mut cols = Vec::with_capacity((k * dim) as usize);
                let mut values = Vec::with_capacity((k * dim) as usize);
                let magnitude = 1.0 / (k as f32).sqrt();
                for col in 0..dim {
                    for row in sample(&mut rng, full as usize, k as usize) {
                        rows.push(row as i64);
                        cols.push(col);
                        values.push(if rng.gen::<bool>() { magnitude } else { -magnitude });
                    }
                }
                Projection::Sparse {
                    rows: Tensor::from_slice(&rows).to_device(device),
                    cols: Tensor::from_slice(&cols).to_device(device),
                    values: Tensor::from_slice(&values).to_device(device),
                    full,
                }
            }
            ProjectionKind::Fastfood => {
                let padded = full.max(dim).max(2) as u64;
                let padded = padded.next_power_of_two() as i64;
                let b: Vec<f32> = (0..padded)
                    .map(|_| if rng.gen::<bool>() { 1.0 } else { -1.0 })
                    .collect();
                let mut pi: Vec<i64> = (0..padded).collect();
                rand::seq::SliceRandom::shuffle(pi.as_mut_slice(), &mut rng);
                let g = normals(&mut rng, padded as usize);
                let g_sq: f64 = g.iter().map(|v| f64::from(*v).powi(2)).sum();
                let scale = 1.0 / ((padded as f64 * g_sq).sqrt() * (full as f64 / padded as f64).sqrt());
                Projection::Fastfood {
                    b: Tensor::from_slice(&b).to_device(device),
                    pi: Tensor::from_slice(&pi).to_device(device),
                    g: Tensor::from_slice(&g).to_device(device),
                    scale,
                    full,
                    padded,
                }
            }
        }
    }

    /// P z, a vector of D; differentiable in z.
    pub fn apply(&self, z: &Tensor) -> Tensor {
        match self {
            Projection::Dense(p) => p.mv(z),
            Projection::Sparse {
                rows,
                cols,
                values,
                full,
            } => Tensor::zeros([*full], (Kind::Float, z.device())).index_add(
                0,
                rows,
                &(z.index_select(0, cols) * values),
            ),
            Projection::Fastfood {
                b,
                pi,
                g,
                scale,
                full,
                padded,
            } => {
                let d = z.size()[0];
                let x = z.constant_pad_nd([0, padded - d]) * b;
                let x = fwht(&x).index_select(0, pi) * g;
                fwht(&x).narrow(0, 0, *full) * *scale
            }
        }
    }
}

/// The unnormalized Walsh-Hadamard transform of a vector whose length is a power of two:
/// H x with H the Sylvester-ordered Hadamard matrix, in log2(n) butterfly passes.
pub fn fwht(x: &Tensor) -> Tensor {
    let n = x.size()[0];
    let mut y = x.shallow_clone();
    let mut h = 1;
    while h < n {
        let pairs = y.view([-1, 2, h]);
        let (a, b) = (pairs.select(1, 0), pairs.select(1, 1));
        y = Tensor::stack(&[&a + &b, a - b], 1).view([n]);
        h *= 2;
    }
    y
}

/// The state of a trial trained in a subspace: theta0, the projection, and z.
pub struct Subspace {
    theta0: Vec<Tensor>,
    projection: Projection,
    /// The one trainable tensor, `subspace.z`.
    pub z: Vec<Param>,
}

impl Subspace {
    /// Freezes the model's current parameters as theta0 and starts z at zero.
    pub fn new(params: &[Param], kind: ProjectionKind, dim: i64, seed: u64, device: Device) -> Subspace {
        let full: i64 = params.iter().map(|p| p.tensor.numel() as i64).sum();
        Subspace {
            theta0: params.iter().map(|p| p.tensor.detach().copy()).collect(),
            projection: Projection::new(kind, full, dim, seed, device),
            z: vec![Param {
                name: "subspace.z".into(),
                tensor: Tensor::zeros([dim], (Kind::Float, device)).set_requires_grad(true),
                role: Role::HiddenWeight,
                lr_mult: 1.0,
            }],
        }
    }

    /// Sets every parameter to theta0 + its slice of P z; with gradients flowing to z.
    pub fn materialize(&self, params: &mut [Param]) {
        let offset = self.projection.apply(&self.z[0].tensor);
        let mut start = 0;
        for (param, theta0) in params.iter_mut().zip(&self.theta0) {
            let n = theta0.numel() as i64;
            param.tensor = theta0 + offset.narrow(0, start, n).view(theta0.size().as_slice());
            start += n;
        }
    }
}

/// Free memory on `device` in bytes, when it can be read: MemAvailable for the CPU,
/// `nvidia-smi` for a CUDA device.
pub fn free_memory(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        }
        Device::Cuda(index) => {
            let out = std::process::Command::new("nvidia-smi")
                .args([
                    "--query-gpu=memory.free",
                    "--format=csv,noheader,nounits",
                    "-i",
                    &index.to_string(),
                ])
                .output()
                .ok()?;
            let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
            Some(mib * 1024 * 1024)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sylvester(n: i64) -> Tensor {
        let mut h = Tensor::ones([1, 1], (Kind::Float, Device::Cpu));
        while h.size()[0] < n {
            let top = Tensor::cat(&[&h, &h], 1);
            let bottom = Tensor::cat(&[&h, &(-&h)], 1);
            h = Tensor::cat(&[top, bottom], 0);
        }
        h
    }

    #[test]
    fn fastfood_equals_its_dense_materialisation() {
        let (full, dim) = (100i64, 12i64);
        let projection = Projection::new(ProjectionKind::Fastfood, full, dim, 9, Device::Cpu);
        let Projection::Fastfood {
            b,
            pi,
            g,
            scale,
            padded,
            ..
        } = &projection
        else {
            unreachable!()
        };
        assert_eq!(*padded, 128);
        // V = (H G Pi H B)[:D, :d] * scale with every factor a plain matrix.
        let h = sylvester(*padded);
        let permutation = Tensor::eye(*padded, (Kind::Float, Device::Cpu)).index_select(0, pi);
        let v = h
            .mm(&Tensor::diag_embed(g, 0, -2, -1))
            .mm(&permutation)
            .mm(&h)
            .mm(&Tensor::diag_embed(b, 0, -2, -1))
            .narrow(0, 0, full)
            .narrow(1, 0, dim)
            * *scale;
        let z = Tensor::from_slice(&normals(&mut ChaCha8Rng::seed_from_u64(1), dim as usize));
        let fast = projection.apply(&z);
        let dense = v.mv(&z);
        let err = (&fast - &dense).abs().max().double_value(&[]);
        let size = dense.abs().max().double_value(&[]);
        assert!(
            err <= 1e-4 * size,
            "fastfood differs from its matrix by {err} (values up to {size})"
        );
        assert_eq!(fast.size(), vec![full]);
    }

    #[test]
    fn every_projection_preserves_norms_in_expectation() {
        let (full, dim) = (300i64, 20i64);
        let z = Tensor::from_slice(&normals(&mut ChaCha8Rng::seed_from_u64(2), dim as usize));
        let z_sq = z.square().sum(Kind::Double).double_value(&[]);
        for kind in [ProjectionKind::Dense, ProjectionKind::Sparse, ProjectionKind::Fastfood] {
            let seeds = 400;
            let mean: f64 = (0..seeds)
                .map(|seed| {
                    let p = Projection::new(kind, full, dim, seed, Device::Cpu);
                    p.apply(&z).square().sum(Kind::Double).double_value(&[]) / z_sq
                })
                .sum::<f64>()
                / seeds as f64;
            assert!((mean - 1.0).abs() < 0.05, "{kind:?}: E|Pz|^2/|z|^2 = {mean}");
        }
    }

    #[test]
    fn fwht_is_the_sylvester_hadamard_matrix() {
        let x = Tensor::from_slice(&[1.0f32, 2.0, -3.0, 0.5, 4.0, 0.0, -1.0, 2.5]);
        let expected = sylvester(8).mv(&x);
        assert!(fwht(&x).allclose(&expected, 1e-6, 1e-6, false));
    }

    #[test]
    fn memory_needs_are_known_before_drawing() {
        assert_eq!(Projection::bytes(ProjectionKind::Dense, 8970, 640), 4 * 8970 * 640);
        assert!(Projection::bytes(ProjectionKind::Fastfood, 199_210, 1500) < 5_000_000);
        assert!(free_memory(Device::Cpu).unwrap() > 0);
    }
}
