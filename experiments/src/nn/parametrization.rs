//! Parametrizations: how initialization, learning rates and multipliers scale
//! with width and depth. Pure rules, no tensors, so they are testable anywhere.
//!
//! We use microsoft/mup's "output multiplier" form. With width ratio
//! m = width / base_width and depth ratio d = depth / base_depth:
//!
//! | | SP | muP, Adam/AdamW | muP, SGD |
//! |---|---|---|---|
//! | input weights, biases | lr | lr | lr * m |
//! | hidden weights | lr | lr / m | lr |
//! | output weights | lr | lr | lr * m |
//! | logits | W h | W h / m | W h / m |
//! | output weights' init std | default | default * sqrt(m) | default * sqrt(m) |
//!
//! Init is otherwise PyTorch's default (variance proportional to 1/fan_in).
//! The readout's init is widened by sqrt(m) as microsoft/mup rescales it, so
//! the effective readout variance (after the 1/m multiplier) is 1/(fan_in * m),
//! proportional to 1/fan_in^2.
//! depth-muP adds, on top of muP, a 1/sqrt(d) multiplier on every residual
//! branch and, with Adam/AdamW, a 1/sqrt(d) learning rate on block parameters.
//! At m = 1 and d = 1 every rule is the identity, so muP equals SP exactly.

use serde::{Deserialize, Serialize};

use crate::nn::kinds::OptimizerName;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[serde(rename_all = "snake_case")]
pub enum Parametrization {
    #[default]
    Sp,
    Mup,
    DepthMup,
}

impl Parametrization {
    pub fn name(self) -> &'static str {
        match self {
            Parametrization::Sp => "sp",
            Parametrization::Mup => "mup",
            Parametrization::DepthMup => "depth_mup",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    InputWeight,
    HiddenWeight,
    OutputWeight,
    Bias,
}

/// The scaling rules for one model instance.
#[derive(Debug, Clone, Copy)]
pub struct Scaling {
    pub parametrization: Parametrization,
    pub optimizer: OptimizerName,
    /// width / base_width
    pub width_mult: f64,
    /// depth / base_depth
    pub depth_mult: f64,
    /// Under muP, start the readout at zero instead of at the widened default
    /// (both are muP; only the widened form equals SP at the base width).
    pub zero_readout: bool,
}

impl Scaling {
    fn mup(&self) -> bool {
        self.parametrization != Parametrization::Sp
    }

    fn adam(&self) -> bool {
        matches!(self.optimizer, OptimizerName::Adam | OptimizerName::Adamw)
    }

    /// Learning-rate multiplier of a parameter; `in_block` marks residual-block parameters.
    pub fn lr_mult(&self, role: Role, in_block: bool) -> f64 {
        let m = self.width_mult;
        let width = if !self.mup() {
            1.0
        } else if self.adam() {
            match role {
                Role::HiddenWeight => 1.0 / m,
                _ => 1.0,
            }
        } else {
            match role {
                Role::HiddenWeight => 1.0,
                _ => m,
            }
        };
        let depth = if self.parametrization == Parametrization::DepthMup && self.adam() && in_block {
            1.0 / self.depth_mult.sqrt()
        } else {
            1.0
        };
        width * depth
    }

    /// Multiplier on the logits.
    pub fn output_mult(&self) -> f64 {
        if self.mup() {
            1.0 / self.width_mult
        } else {
            1.0
        }
    }

    /// Multiplier on the output weights' init scale.
    pub fn output_init_mult(&self) -> f64 {
        match (self.mup(), self.zero_readout) {
            (false, _) => 1.0,
            (true, false) => self.width_mult.sqrt(),
            (true, true) => 0.0,
        }
    }

    /// Multiplier on every residual branch.
    pub fn branch_mult(&self) -> f64 {
        if self.parametrization == Parametrization::DepthMup {
            1.0 / self.depth_mult.sqrt()
        } else {
            1.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: [Role; 4] = [Role::InputWeight, Role::HiddenWeight, Role::OutputWeight, Role::Bias];

    #[test]
    fn every_parametrization_is_sp_at_the_base_shape() {
        for p in [Parametrization::Sp, Parametrization::Mup, Parametrization::DepthMup] {
            for optimizer in [OptimizerName::Sgd, OptimizerName::Adam, OptimizerName::Adamw] {
                let s = Scaling {
                    parametrization: p,
                    optimizer,
                    width_mult: 1.0,
                    depth_mult: 1.0,
                    zero_readout: false,
                };
                for role in ROLES {
                    assert_eq!(s.lr_mult(role, true), 1.0);
                }
                assert_eq!(
                    (s.output_mult(), s.branch_mult(), s.output_init_mult()),
                    (1.0, 1.0, 1.0)
                );
            }
        }
    }

    #[test]
    fn mup_scales_hidden_lr_for_adam_and_the_rest_for_sgd() {
        let adam = Scaling {
            parametrization: Parametrization::Mup,
            optimizer: OptimizerName::Adam,
            width_mult: 4.0,
            depth_mult: 1.0,
            zero_readout: false,
        };
        assert_eq!(adam.lr_mult(Role::HiddenWeight, false), 0.25);
        assert_eq!(adam.lr_mult(Role::InputWeight, false), 1.0);
        assert_eq!(adam.lr_mult(Role::OutputWeight, false), 1.0);
        assert_eq!(adam.output_mult(), 0.25);
        let sgd = Scaling {
            optimizer: OptimizerName::Sgd,
            ..adam
        };
        assert_eq!(sgd.lr_mult(Role::HiddenWeight, false), 1.0);
        assert_eq!(sgd.lr_mult(Role::InputWeight, false), 4.0);
        assert_eq!(sgd.lr_mult(Role::Bias, false), 4.0);
        let depth = Scaling {
            parametrization: Parametrization::DepthMup,
            depth_mult: 16.0,
            ..adam
        };
        assert_eq!(depth.branch_mult(), 0.25);
        assert_eq!(depth.lr_mult(Role::HiddenWeight, true), 0.25 * 0.25);
        assert_eq!(depth.lr_mult(Role::InputWeight, false), 1.0);
    }
}
