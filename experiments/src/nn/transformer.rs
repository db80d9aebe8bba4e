//! A small decoder-only transformer on plain tensors, in SP or muP form.
//!
//! Pre-LayerNorm blocks (causal self-attention, then a 4x ReLU MLP), learned
//! token and position embeddings, a linear readout. muP form, with width
//! ratio m = d_model / base d_model: attention logits scaled by sqrt(d0)/d
//! (1/d in width, and 1/sqrt(d) at the base width), query and readout
//! initialised at zero, hidden matrices' Adam learning rate divided by m,
//! logits multiplied by 1/m. Embeddings and LayerNorm parameters keep the base
//! learning rate. The critical-batch-size family reuses this model.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::nn::model::{uniform, Param, Role};
use crate::nn::parametrization::{Parametrization, Scaling};

#[derive(Debug, Clone, Copy)]
pub struct GptShape {
    pub vocab: i64,
    pub context: i64,
    pub d_model: i64,
    pub layers: u32,
    pub heads: i64,
    /// The head dimension at the base width (for the muP attention scale).
    pub base_head_dim: i64,
}

pub struct Gpt {
    pub params: Vec<Param>,
    shape: GptShape,
    attn_scale: f64,
    output_mult: f64,
}

impl Gpt {
    pub fn new(shape: GptShape, scaling: Scaling, seed: u64, device: Device) -> Gpt {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6a7e_0000_0000_0002);
        let mup = scaling.parametrization != Parametrization::Sp;
        let d = shape.d_model;
        let head_dim = d / shape.heads;
        let mut params = Vec::new();
        let mut add = |name: String, tensor: Tensor, role: Role, in_block: bool| {
            params.push(Param {
                name,
                tensor,
                role,
                lr_mult: scaling.lr_mult(role, in_block),
            })
        };
        let ones = |n: i64| Tensor::ones([n], (Kind::Float, device)).set_requires_grad(true);
        let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, device)).set_requires_grad(true);
        add(
            "tok_emb".into(),
            uniform(&mut rng, &[shape.vocab, d], 1.0, device),
            Role::InputWeight,
            false,
        );
        add(
            "pos_emb".into(),
            uniform(&mut rng, &[shape.context, d], 1.0, device),
            Role::InputWeight,
            false,
        );
        let bound = 1.0 / (d as f64).sqrt();
        for l in 0..shape.layers {
            add(format!("blocks.{l}.ln1.weight"), ones(d), Role::Bias, true);
            add(format!("blocks.{l}.ln1.bias"), zeros(&[d]), Role::Bias, true);
            let query = if mup {
                zeros(&[d, d])
            } else {
                uniform(&mut rng, &[d, d], bound, device)
            };
            add(format!("blocks.{l}.attn.query"), query, Role::HiddenWeight, true);
            for m in ["key", "value", "out"] {
                add(
                    format!("blocks.{l}.attn.{m}"),
                    uniform(&mut rng, &[d, d], bound, device),
                    Role::HiddenWeight,
                    true,
                );
            }
            add(format!("blocks.{l}.ln2.weight"), ones(d), Role::Bias, true);
            add(format!("blocks.{l}.ln2.bias"), zeros(&[d]), Role::Bias, true);
            add(
                format!("blocks.{l}.mlp.up"),
                uniform(&mut rng, &[4 * d, d], bound, device),
                Role::HiddenWeight,
                true,
            );
            let down_bound = 1.0 / ((4 * d) as f64).sqrt();
            add(
                format!("blocks.{l}.mlp.down"),
                uniform(&mut rng, &[d, 4 * d], down_bound, device),
                Role::HiddenWeight,
                true,
            );
        }
        add("ln_f.weight".into(), ones(d), Role::Bias, false);
        add("ln_f.bias".into(), zeros(&[d]), Role::Bias, false);
        let readout = if mup {
            zeros(&[shape.vocab, d])
        } else {
            uniform(&mut rng, &[shape.vocab, d], bound, device)
        };
        add("readout".into(), readout, Role::OutputWeight, false);
        let attn_scale = if mup {
            (shape.base_head_dim as f64).sqrt() / head_dim as f64
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        Gpt {
            params,
            shape,
            attn_scale,
            output_mult: scaling.output_mult(),
        }
    }

    fn p(&self, name: &str) -> &Tensor {
        &self
            .params
            .iter()
            .find(|p| p.name == name)
            .expect("a parameter of this model")
            .tensor
    }

    /// Logits `[batch, time, vocab]` for token ids `[batch, time]`.
    pub fn forward(&self, idx: &Tensor) -> Tensor {
        let (b, t) = idx.size2().expect("token ids are [batch, time]");
        let d = self.shape.d_model;
        let h = self.shape.heads;
        let positions = Tensor::arange(t, (Kind::Int64, idx.device()));
        let mut x = self.p("tok_emb").index_select(0, &idx.view([-1])).view([b, t, d])
            + self.p("pos_emb").index_select(0, &positions).unsqueeze(0);
        for l in 0..self.shape.layers {
            let ln = |x: &Tensor, which: &str| {
                x.layer_norm(
                    [d],
                    Some(self.p(&format!("blocks.{l}.{which}.weight"))),
                    Some(self.p(&format!("blocks.{l}.{which}.bias"))),
                    1e-5,
                    true,
                )
            };
            let a = ln(&x, "ln1");
            let heads = |w: &str| {
                a.matmul(&self.p(&format!("blocks.{l}.attn.{w}")).tr())
                    .view([b, t, h, d / h])
                    .transpose(1, 2)
            };
            let y = Tensor::scaled_dot_product_attention(
                &heads("query"),
                &heads("key"),
                &heads("value"),
                None::<Tensor>,
                0.0,
                true,
                self.attn_scale,
                false,
            );
            let y = y.transpose(1, 2).contiguous().view([b, t, d]);
            x = y.matmul(&self.p(&format!("blocks.{l}.attn.out")).tr()) + x;
            let m = ln(&x, "ln2");
            let m = m.matmul(&self.p(&format!("blocks.{l}.mlp.up")).tr()).relu();
            x = m.matmul(&self.p(&format!("blocks.{l}.mlp.down")).tr()) + x;
        }
        let x = x.layer_norm([d], Some(self.p("ln_f.weight")), Some(self.p("ln_f.bias")), 1e-5, true);
        x.matmul(&self.p("readout").tr()) * self.output_mult
    }
}
