//! The component IR: a model as typed components, with shapes and parameter counts, in a text
//! form that a person can read and diff and that parses back to the same value.
//!
//! Components are named as interpretability papers name them:
//!
//! | name        | component                                                        |
//! |-------------|------------------------------------------------------------------|
//! | `embed`     | the token embedding                                              |
//! | `L3`        | decoder block 3                                                  |
//! | `L3.attn`   | its attention                                                    |
//! | `L3.H7`     | query head 7 of block 3 (reads kv group `7 / (heads / kv_heads)`) |
//! | `L3.mlp`    | its MLP                                                          |
//! | `L3.N1024`  | MLP neuron 1024 (row of gate/up, column of down)                 |
//! | `unembed`   | the unembedding (`lm_head`, shared with `embed` when tied)       |
//! | `d0`        | a named direction in the residual stream, at a hook site         |
//!
//! Text form (one line per block, so that a 30-layer model with 46k neurons stays readable; the
//! heads and neurons of a block are implied by its `heads`, `kv` and `d_ff`, and
//! [`Ir::components`] expands them):
//!
//! ```text
//! model llama d_model=576 d_head=64 vocab=49152 tied=true final_norm=576
//! embed params=28311552
//! L0 heads=9 kv=3 d_ff=1536 attn=884736 mlp=2654208 norm=1152
//! unembed params=0
//! d0 site=blocks.12.hook_resid_post name="refusal"
//! ```
//!
//! Lines starting with `;` are comments. Per-layer widths come from the weights, not the
//! config, so pruned models (different head counts or d_ff per layer) are described right.

pub mod findings;
pub mod random;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::runtime::HookPoint;

pub use findings::{Findings, Score, Source};

/// One component of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Embed,
    Block(usize),
    Attn(usize),
    Head { layer: usize, head: usize },
    Mlp(usize),
    Neuron { layer: usize, n: usize },
    Unembed,
    Direction(usize),
}

/// The kind of a component, for selecting findings (`by kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Embed,
    Block,
    Attn,
    Head,
    Mlp,
    Neuron,
    Unembed,
    Direction,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Embed,
        Kind::Block,
        Kind::Attn,
        Kind::Head,
        Kind::Mlp,
        Kind::Neuron,
        Kind::Unembed,
        Kind::Direction,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Kind::Embed => "embed",
            Kind::Block => "block",
            Kind::Attn => "attn",
            Kind::Head => "head",
            Kind::Mlp => "mlp",
            Kind::Neuron => "neuron",
            Kind::Unembed => "unembed",
            Kind::Direction => "direction",
        }
    }
}

impl FromStr for Kind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
            Error::invalid(format!("unknown component kind `{s}` (one of {})", names.join(", ")))
        })
    }
}

impl Component {
    pub fn kind(&self) -> Kind {
        match self {
            Component::Embed => Kind::Embed,
            Component::Block(_) => Kind::Block,
            Component::Attn(_) => Kind::Attn,
            Component::Head { .. } => Kind::Head,
            Component::Mlp(_) => Kind::Mlp,
            Component::Neuron { .. } => Kind::Neuron,
            Component::Unembed => Kind::Unembed,
            Component::Direction(_) => Kind::Direction,
        }
    }

    /// The block the component belongs to, if any.
    pub fn layer(&self) -> Option<usize> {
        match *self {
            Component::Block(l) | Component::Attn(l) | Component::Mlp(l) => Some(l),
            Component::Head { layer, .. } | Component::Neuron { layer, .. } => Some(layer),
            _ => None,
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Component::Embed => write!(f, "embed"),
            Component::Block(l) => write!(f, "L{l}"),
            Component::Attn(l) => write!(f, "L{l}.attn"),
            Component::Head { layer, head } => write!(f, "L{layer}.H{head}"),
            Component::Mlp(l) => write!(f, "L{l}.mlp"),
            Component::Neuron { layer, n } => write!(f, "L{layer}.N{n}"),
            Component::Unembed => write!(f, "unembed"),
            Component::Direction(i) => write!(f, "d{i}"),
        }
    }
}

/// A decimal index without sign or leading zeros (so that every name has one spelling).
fn index(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

impl FromStr for Component {
    type Err = Error;
    fn from_str(s: &str) -> Result<Component> {
        let bad = || {
            Error::invalid(format!(
                "bad component `{s}` (e.g. embed, L3, L3.attn, L3.H7, L3.mlp, L3.N1024, unembed, d0)"
            ))
        };
        match s {
            "embed" => return Ok(Component::Embed),
            "unembed" => return Ok(Component::Unembed),
            _ => {}
        }
        if let Some(i) = s.strip_prefix('d') {
            return index(i).map(Component::Direction).ok_or_else(bad);
        }
        let rest = s.strip_prefix('L').ok_or_else(bad)?;
        let (l, sub) = match rest.split_once('.') {
            Some((l, sub)) => (l, Some(sub)),
            None => (rest, None),
        };
        let layer = index(l).ok_or_else(bad)?;
        Ok(match sub {
            None => Component::Block(layer),
            Some("attn") => Component::Attn(layer),
            Some("mlp") => Component::Mlp(layer),
            Some(sub) => {
                if let Some(h) = sub.strip_prefix('H') {
                    Component::Head {
                        layer,
                        head: index(h).ok_or_else(bad)?,
                    }
                } else if let Some(n) = sub.strip_prefix('N') {
                    Component::Neuron {
                        layer,
                        n: index(n).ok_or_else(bad)?,
                    }
                } else {
                    return Err(bad());
                }
            }
        })
    }
}

impl Serialize for Component {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Component {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: Error| serde::de::Error::custom(e.to_string()))
    }
}

/// A hook site, serialised by its TransformerLens name.
mod hook_name {
    use super::*;
    pub fn serialize<S: serde::Serializer>(p: &HookPoint, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(p)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<HookPoint, D::Error> {
        let s = String::deserialize(d)?;
        HookPoint::parse(&s).map_err(|e| serde::de::Error::custom(e.to_string()))
    }
}

/// One decoder block: widths read from its weights, parameter counts by part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIr {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; query head h reads kv group `h / (heads / kv_heads)`.
    pub kv_heads: usize,
    /// MLP neurons.
    pub d_ff: usize,
    /// Parameters of q/k/v/o (weights and biases).
    pub attn_params: usize,
    /// Parameters of gate/up/down (weights and biases).
    pub mlp_params: usize,
    /// Parameters of the block's two norms.
    pub norm_params: usize,
}

impl LayerIr {
    /// The kv group query head `h` reads.
    pub fn kv_group(&self, h: usize) -> usize {
        let g = (self.heads / self.kv_heads.max(1)).max(1);
        h / g
    }
    pub fn params(&self) -> usize {
        self.attn_params + self.mlp_params + self.norm_params
    }
}

/// A named direction in the residual stream, living at one hook site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionIr {
    #[serde(with = "hook_name")]
    pub site: HookPoint,
    pub name: String,
}

/// The model as components.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ir {
    pub arch: String,
    pub d_model: usize,
    pub d_head: usize,
    pub vocab: usize,
    pub tied: bool,
    pub embed_params: usize,
    pub final_norm_params: usize,
    /// 0 when tied (the tensor is counted once, under `embed`).
    pub unembed_params: usize,
    pub layers: Vec<LayerIr>,
    /// `d{i}` is `directions[i]`.
    pub directions: Vec<DirectionIr>,
}

/// What a component is: the shape of its activation at one position (what it writes or reads
/// at its hook site: `[d_model]` for the residual stream, `[heads, d_head]` for `L.attn` at
/// `attn.hook_z`, `[d_ff]` for `L.mlp` at `mlp.hook_post`, `[]` for one neuron, `[vocab]` for
/// `unembed`) and the parameters it owns (a head owns its q rows and o columns, not the k/v it
/// shares with its group; a neuron its gate/up rows and down column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComponentInfo {
    pub shape: Vec<usize>,
    pub params: usize,
}

impl Ir {
    pub fn from_model(m: &Model) -> Ir {
        let count = |lin: &crate::model::Linear| lin.w().elem_count() + lin.b.as_ref().map_or(0, |b| b.elem_count());
        let d_head = m.cfg.head_dim;
        let layers = m
            .blocks
            .iter()
            .map(|b| LayerIr {
                heads: b.q.out_features() / d_head,
                kv_heads: b.k.out_features() / d_head,
                d_ff: b.gate.out_features(),
                attn_params: count(&b.q) + count(&b.k) + count(&b.v) + count(&b.o),
                mlp_params: count(&b.gate) + count(&b.up) + count(&b.down),
                norm_params: b.attn_norm.elem_count() + b.mlp_norm.elem_count(),
            })
            .collect();
        Ir {
            arch: m.cfg.arch.name().to_string(),
            d_model: m.cfg.hidden_size,
            d_head,
            vocab: m.cfg.vocab_size,
            tied: m.cfg.tie_word_embeddings,
            embed_params: m.embed.elem_count(),
            final_norm_params: m.norm.elem_count(),
            unembed_params: if m.cfg.tie_word_embeddings {
                0
            } else {
                m.lm_head.elem_count()
            },
            layers,
            directions: vec![],
        }
    }

    /// Parameters of the whole model (equals `Model::param_count`).
    pub fn params(&self) -> usize {
        self.embed_params + self.final_norm_params + self.unembed_params + self.layers.iter().map(LayerIr::params).sum::<usize>()
    }

    /// Add a direction at a site; returns its component (`d{i}`).
    pub fn add_direction(&mut self, site: HookPoint, name: &str) -> Component {
        self.directions.push(DirectionIr {
            site,
            name: name.to_string(),
        });
        Component::Direction(self.directions.len() - 1)
    }

    /// Every component, in model order: embed, then per block `L`, `L.attn`, its heads, `L.mlp`,
    /// its neurons; unembed; directions.
    pub fn components(&self) -> Vec<Component> {
        let mut v = vec![Component::Embed];
        for (l, li) in self.layers.iter().enumerate() {
            v.push(Component::Block(l));
            v.push(Component::Attn(l));
            v.extend((0..li.heads).map(|head| Component::Head { layer: l, head }));
            v.push(Component::Mlp(l));
            v.extend((0..li.d_ff).map(|n| Component::Neuron { layer: l, n }));
        }
        v.push(Component::Unembed);
        v.extend((0..self.directions.len()).map(Component::Direction));
        v
    }

    /// The component's shape and parameters, or an error if the model has no such component.
    pub fn info(&self, c: Component) -> Result<ComponentInfo> {
        let missing = || Error::invalid(format!("the model has no component {c}"));
        let layer = |l: usize| self.layers.get(l).ok_or_else(missing);
        let d = self.d_model;
        Ok(match c {
            Component::Embed => ComponentInfo {
                shape: vec![d],
                params: self.embed_params,
            },
            Component::Unembed => ComponentInfo {
                shape: vec![self.vocab],
                params: self.unembed_params,
            },
            Component::Block(l) => ComponentInfo {
                shape: vec![d],
                params: layer(l)?.params(),
            },
            Component::Attn(l) => {
                let li = layer(l)?;
                ComponentInfo {
                    shape: vec![li.heads, self.d_head],
                    params: li.attn_params,
                }
            }
            Component::Mlp(l) => {
                let li = layer(l)?;
                ComponentInfo {
                    shape: vec![li.d_ff],
                    params: li.mlp_params,
                }
            }
            Component::Head { layer: l, head } => {
                let li = layer(l)?;
                if head >= li.heads {
                    return Err(missing());
                }
                // q rows (+ their bias, if q has one) and o columns. The q bias exists iff the
                // attention parameter count exceeds the weights alone.
                let q_rows = self.d_head * d;
                let weights = (2 * li.heads + 2 * li.kv_heads) * self.d_head * d;
                let bias_q = if li.attn_params > weights { self.d_head } else { 0 };
                ComponentInfo {
                    shape: vec![self.d_head],
                    params: q_rows + bias_q + d * self.d_head,
                }
            }
            Component::Neuron { layer: l, n } => {
                let li = layer(l)?;
                if n >= li.d_ff {
                    return Err(missing());
                }
                // gate row, up row, down column, and the gate/up bias entries if present.
                let bias = if li.mlp_params > 3 * li.d_ff * d { 2 } else { 0 };
                ComponentInfo {
                    shape: vec![],
                    params: 3 * d + bias,
                }
            }
            Component::Direction(i) => {
                self.directions.get(i).ok_or_else(missing)?;
                ComponentInfo {
                    shape: vec![d],
                    params: 0,
                }
            }
        })
    }

    /// Whether the model has this component.
    pub fn contains(&self, c: Component) -> bool {
        self.info(c).is_ok()
    }

    /// The text form (see the module documentation).
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "; mechc IR: {} blocks, {} parameters; head L.Hh reads kv group h / (heads / kv)\n",
            self.layers.len(),
            self.params()
        ));
        s.push_str(&format!(
            "model {} d_model={} d_head={} vocab={} tied={} final_norm={}\n",
            self.arch, self.d_model, self.d_head, self.vocab, self.tied, self.final_norm_params
        ));
        s.push_str(&format!("embed params={}\n", self.embed_params));
        for (l, li) in self.layers.iter().enumerate() {
            s.push_str(&format!(
                "L{l} heads={} kv={} d_ff={} attn={} mlp={} norm={}\n",
                li.heads, li.kv_heads, li.d_ff, li.attn_params, li.mlp_params, li.norm_params
            ));
        }
        s.push_str(&format!("unembed params={}\n", self.unembed_params));
        for (i, d) in self.directions.iter().enumerate() {
            let name = serde_json::to_string(&d.name).unwrap_or_else(|_| "\"\"".into());
            s.push_str(&format!("d{i} site={} name={name}\n", d.site));
        }
        s
    }

    /// Parse the text form. Errors name the line.
    pub fn parse(text: &str) -> Result<Ir> {
        let mut model: Option<(String, Fields)> = None;
        let (mut embed, mut unembed) = (None, None);
        let mut layers: Vec<LayerIr> = vec![];
        let mut directions: Vec<DirectionIr> = vec![];
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with(';') {
                continue;
            }
            let err = |msg: String| Error::invalid(format!("IR line {}: {msg}", i + 1));
            let (head, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match head {
                "model" => {
                    let (arch, fields) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                    if arch.is_empty() || arch.contains('=') {
                        return Err(err(
                            "`model` needs the architecture first (e.g. `model llama d_model=...`)".into()
                        ));
                    }
                    model = Some((arch.to_string(), Fields::parse(fields).map_err(err)?));
                }
                "embed" => embed = Some(Fields::parse(rest).map_err(err)?.take_usize("params").map_err(err)?),
                "unembed" => unembed = Some(Fields::parse(rest).map_err(err)?.take_usize("params").map_err(err)?),
                _ if head.starts_with('d') => {
                    let c: Component = head.parse().map_err(|e: Error| err(e.to_string()))?;
                    if c != Component::Direction(directions.len()) {
                        return Err(err(format!(
                            "direction `{head}` out of order (expected d{})",
                            directions.len()
                        )));
                    }
                    let (site, name) = rest
                        .split_once(" name=")
                        .ok_or_else(|| err("expected `site=HOOK name=\"...\"`".into()))?;
                    let site = site
                        .trim()
                        .strip_prefix("site=")
                        .ok_or_else(|| err("expected `site=HOOK`".into()))?;
                    let site = HookPoint::parse(site).map_err(|e| err(e.to_string()))?;
                    let name: String = serde_json::from_str(name.trim()).map_err(|e| err(format!("bad name: {e}")))?;
                    directions.push(DirectionIr { site, name });
                }
                _ => {
                    let c: Component = head.parse().map_err(|e: Error| err(e.to_string()))?;
                    if c != Component::Block(layers.len()) {
                        return Err(err(format!("expected block L{} here, found `{head}`", layers.len())));
                    }
                    let mut f = Fields::parse(rest).map_err(err)?;
                    let li = LayerIr {
                        heads: f.take_usize("heads").map_err(err)?,
                        kv_heads: f.take_usize("kv").map_err(err)?,
                        d_ff: f.take_usize("d_ff").map_err(err)?,
                        attn_params: f.take_usize("attn").map_err(err)?,
                        mlp_params: f.take_usize("mlp").map_err(err)?,
                        norm_params: f.take_usize("norm").map_err(err)?,
                    };
                    f.done().map_err(err)?;
                    if li.kv_heads == 0 || li.heads % li.kv_heads != 0 {
                        return Err(err(format!("{} heads do not split into {} kv groups", li.heads, li.kv_heads)));
                    }
                    layers.push(li);
                }
            }
        }
        let (arch, mut f) = model.ok_or_else(|| Error::invalid("IR: missing the `model` line"))?;
        let me = |s: String| Error::invalid(format!("IR `model` line: {s}"));
        let ir = Ir {
            arch,
            d_model: f.take_usize("d_model").map_err(me)?,
            d_head: f.take_usize("d_head").map_err(me)?,
            vocab: f.take_usize("vocab").map_err(me)?,
            tied: f
                .take("tied")
                .map_err(me)?
                .parse()
                .map_err(|_| Error::invalid("IR `model` line: `tied` must be true or false"))?,
            final_norm_params: f.take_usize("final_norm").map_err(me)?,
            embed_params: embed.ok_or_else(|| Error::invalid("IR: missing the `embed` line"))?,
            unembed_params: unembed.ok_or_else(|| Error::invalid("IR: missing the `unembed` line"))?,
            layers,
            directions,
        };
        f.done().map_err(me)?;
        Ok(ir)
    }
}

/// `key=value` fields of one line, each used once.
struct Fields(Vec<(String, String)>);

impl Fields {
    fn parse(s: &str) -> std::result::Result<Fields, String> {
        let mut v = vec![];
        for tok in s.split_whitespace() {
            let (k, val) = tok
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, found `{tok}`"))?;
            if v.iter().any(|(kk, _): &(String, String)| kk == k) {
                return Err(format!("field `{k}` given twice"));
            }
            v.push((k.to_string(), val.to_string()));
        }
        Ok(Fields(v))
    }
    fn take(&mut self, k: &str) -> std::result::Result<String, String> {
        let i = self
            .0
            .iter()
            .position(|(kk, _)| kk == k)
            .ok_or_else(|| format!("missing field `{k}`"))?;
        Ok(self.0.remove(i).1)
    }
    fn take_usize(&mut self, k: &str) -> std::result::Result<usize, String> {
        let v = self.take(k)?;
        index(&v).ok_or_else(|| format!("field `{k}`: `{v}` is not a non-negative integer"))
    }
    fn done(self) -> std::result::Result<(), String> {
        match self.0.first() {
            Some((k, _)) => Err(format!("unknown field `{k}`")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for s in [
            "embed", "L0", "L3.attn", "L3.H7", "L12.mlp", "L3.N1024", "unembed", "d0", "d12",
        ] {
            assert_eq!(s.parse::<Component>().unwrap().to_string(), s);
        }
        for bad in [
            "", "L", "L03", "L3.", "L3.H", "L3.X1", "l3", "L-1", "d", "d01", "L3.H7.x", "Embed", "L+3",
        ] {
            assert!(bad.parse::<Component>().is_err(), "`{bad}` parsed");
        }
    }

    #[test]
    fn bad_ir_text_errors_name_the_line() {
        let ok = "model llama d_model=4 d_head=2 vocab=8 tied=true final_norm=4\nembed params=32\nL0 heads=2 kv=1 d_ff=3 attn=48 mlp=36 norm=8\nunembed params=0\n";
        assert!(Ir::parse(ok).is_ok());
        let e = Ir::parse(&ok.replace("d_ff=3", "d_ff=x")).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("d_ff"), "{e}");
        let e = Ir::parse(&ok.replace("L0", "L1")).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
        let e = Ir::parse(&ok.replace("kv=1", "kv=3")).unwrap_err().to_string();
        assert!(e.contains("kv groups"), "{e}");
        assert!(Ir::parse(&ok.replace("embed params=32\n", "")).is_err());
        assert!(Ir::parse(&ok.replace("tied=true", "tied=yes")).is_err());
        assert!(Ir::parse(&ok.replace("norm=8", "norm=8 extra=1")).is_err());
    }
}
