//! Pass targets chosen from findings. Before a pass is built, two forms in its options are
//! rewritten into the explicit ones every pass already reads, so passes know nothing of findings:
//!
//! - `select = { by = ID, lowest = 3 }` (or `highest = N`, or `fraction = 0.2` with
//!   `from = "lowest"` (default) | `"highest"`; `per_layer = true` counts within each layer,
//!   `per_group = true` within each kv group (heads); `layers = [..]` restricts the candidates;
//!   `kind = "head"` picks one kind when the findings score several) becomes `layers = [..]`
//!   (blocks), `heads = ["L3.H2", ..]` (query heads) or `neurons = { "3" = [..] }` (MLP neurons).
//! - `direction = { by = ID }` (a step that wrote vectors; `layer = L` for that layer's vector instead of
//!   the best one) becomes `direction = "<cache>/vectors.safetensors:<tensor>"` (also in
//!   `[verify.steer]`, through [`direction`]). A fractional layer (`layer = 13.4`, a pass's only)
//!   becomes the inline vector (1 − 0.4)·v̂13 + 0.4·v̂14, renormalised (heretic's direction index).
//!
//! `ID` is a `[[locate]]` step's id. What was chosen, from which findings (with their hash),
//! goes into the manifest.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use super::locate_steps::StepFindings;
use crate::error::{Error, Result};
use crate::ir::{Component, Ir, Kind};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Select {
    by: String,
    kind: Option<Kind>,
    lowest: Option<usize>,
    highest: Option<usize>,
    fraction: Option<f64>,
    from: Option<String>,
    #[serde(default)]
    per_layer: bool,
    #[serde(default)]
    per_group: bool,
    layers: Option<Vec<usize>>,
}

pub use crate::ir::findings::FromDirection;

/// The options with `select` / `direction = { by }` replaced, and a record of each use.
pub fn resolve(options: &toml::Table, steps: &[StepFindings], ir: &Ir) -> Result<(toml::Table, Vec<Value>)> {
    let mut out = options.clone();
    let mut used = vec![];
    if let Some(v) = out.remove("select") {
        let toml::Value::Table(t) = v else {
            return Err(Error::invalid("select: expected a table, e.g. select = { by = \"bi\", lowest = 3 }"));
        };
        let sel: Select = super::pipeline::table_as(&t).map_err(|e| Error::invalid(format!("select: {e}")))?;
        let step = step(steps, &sel.by)?;
        let chosen = choose(&sel, step, ir)?;
        let (key, value) = as_option(&chosen)?;
        if out.contains_key(key) {
            return Err(Error::invalid(format!("`select` and `{key}` both given: pick one")));
        }
        out.insert(key.into(), value);
        used.push(json!({
            "option": key, "by": step.id, "method": step.method, "findings_sha256": step.sha256,
            "selected": chosen.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        }));
    }
    if let Some(toml::Value::Table(t)) = out.get("direction") {
        let d: FromDirection = super::pipeline::table_as(t).map_err(|e| Error::invalid(format!("direction: {e}")))?;
        let (value, record) = pass_direction(&d, steps)?;
        out.insert("direction".into(), value);
        used.push(record);
    }
    Ok((out, used))
}

/// The vectors file and tensor (`FILE:TENSOR`) a [`FromDirection`] names, and its record.
pub fn direction(d: &FromDirection, steps: &[StepFindings]) -> Result<(String, Value)> {
    let layer = match d.layer {
        Some(l) if l.fract() != 0.0 || l < 0.0 => {
            return Err(Error::invalid(format!("direction: layer = {l}: a fractional (or negative) layer applies to a pass's direction only")))
        }
        l => l.map(|l| l as usize),
    };
    let step = step(steps, &d.by)?;
    let (vectors, tensor) = tensor_at(step, layer)?;
    let path = format!("{}:{tensor}", vectors.display());
    Ok((path, json!({"option": "direction", "by": step.id, "method": step.method, "findings_sha256": step.sha256, "selected": tensor})))
}

/// A pass's `direction`: [`direction`]'s `FILE:TENSOR`, or for a fractional layer the mix of
/// the two layers' unit vectors as an inline array.
fn pass_direction(d: &FromDirection, steps: &[StepFindings]) -> Result<(toml::Value, Value)> {
    let Some(l) = d.layer.filter(|l| l.fract() != 0.0) else {
        let (path, record) = direction(d, steps)?;
        return Ok((toml::Value::String(path), record));
    };
    if !(l > 0.0 && l.is_finite()) {
        return Err(Error::invalid(format!("direction: layer = {l}: must be ≥ 0")));
    }
    let step = step(steps, &d.by)?;
    let (lo, w) = (l.floor() as usize, l.fract());
    let (file, a) = tensor_at(step, Some(lo))?;
    let (_, b) = tensor_at(step, Some(lo + 1))?;
    let tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).map_err(|e| Error::bad_file(&file, e.to_string()))?;
    let unit = |name: &str| -> Result<Vec<f64>> {
        let t = tensors.get(name).ok_or_else(|| Error::bad_file(&file, format!("no tensor `{name}`")))?;
        let v: Vec<f64> = t.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1()?;
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if !(n > 0.0 && n.is_finite()) {
            return Err(Error::bad_file(&file, format!("tensor `{name}` has no usable length")));
        }
        Ok(v.into_iter().map(|x| x / n).collect())
    };
    let (va, vb) = (unit(&a)?, unit(&b)?);
    let mix: Vec<f64> = va.iter().zip(&vb).map(|(x, y)| (1.0 - w) * x + w * y).collect();
    let n = mix.iter().map(|x| x * x).sum::<f64>().sqrt();
    if !(n > 1e-12) {
        return Err(Error::invalid(format!("direction: layer = {l}: the two layers' directions cancel")));
    }
    let value = toml::Value::Array(mix.iter().map(|x| toml::Value::Float(((x / n) as f32) as f64)).collect());
    let record = json!({"option": "direction", "by": step.id, "method": step.method, "findings_sha256": step.sha256,
        "selected": format!("{:.3}·{a} + {:.3}·{b}", 1.0 - w, w)});
    Ok((value, record))
}

/// The vectors file of `step` and the tensor of `layer` (None: the best layer's).
fn tensor_at(step: &StepFindings, layer: Option<usize>) -> Result<(std::path::PathBuf, String)> {
    let Some(vectors) = step.vectors_path() else {
        return Err(Error::invalid(format!("direction: `{}` is a {} step, which wrote no vectors (a `direction` step does)", step.id, step.method)));
    };
    let tensor = match layer {
        None => step.findings.summary.get("best_tensor").and_then(Value::as_str).map(str::to_string),
        Some(l) => step
            .findings
            .scores
            .iter()
            .find(|s| s.extra.get("layer").and_then(Value::as_u64) == Some(l as u64))
            .and_then(|s| s.extra.get("tensor").and_then(Value::as_str).map(str::to_string)),
    }
    .ok_or_else(|| Error::invalid(format!("direction: the `{}` findings have no vector{}", step.id, layer.map_or(String::new(), |l| format!(" at layer {l}")))))?;
    Ok((vectors.to_path_buf(), tensor))
}

/// One line for a record of [`resolve`]: which option came from which findings, and what it
/// chose (the first few of a long list).
pub fn describe(used: &Value) -> String {
    let names = |v: &[Value]| v.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ");
    let chosen = match &used["selected"] {
        Value::Array(v) if v.len() > 8 => format!("{} components: {}, ...", v.len(), names(&v[..8])),
        Value::Array(v) => names(v),
        other => other.as_str().unwrap_or_default().to_string(),
    };
    let field = |k: &str| used[k].as_str().unwrap_or_default().to_string();
    format!("{} from `{}` findings: {chosen}", field("option"), field("by"))
}

fn step<'a>(steps: &'a [StepFindings], id: &str) -> Result<&'a StepFindings> {
    steps.iter().find(|s| s.id == id).ok_or_else(|| {
        let ids: Vec<&str> = steps.iter().map(|s| s.id.as_str()).collect();
        Error::invalid(format!(
            "by = \"{id}\": no [[locate]] step has that id ({})",
            if ids.is_empty() { "the pipeline has no [[locate]] steps".to_string() } else { format!("ids: {}", ids.join(", ")) }
        ))
    })
}

/// The chosen components, in component order.
fn choose(sel: &Select, step: &StepFindings, ir: &Ir) -> Result<Vec<Component>> {
    let kinds: std::collections::BTreeSet<Kind> = step.findings.scores.iter().map(|s| s.component.kind()).collect();
    let kind = match sel.kind {
        Some(k) if kinds.contains(&k) => k,
        Some(k) => return Err(Error::invalid(format!("select: the `{}` findings score no {k:?} components (they score {kinds:?})", step.id))),
        None if kinds.len() == 1 => *kinds.iter().next().expect("one kind"),
        None => return Err(Error::invalid(format!("select: the `{}` findings score several kinds {kinds:?}: say which with kind = \"...\"", step.id))),
    };
    let counts = [sel.lowest.is_some(), sel.highest.is_some(), sel.fraction.is_some()].iter().filter(|b| **b).count();
    if counts != 1 {
        return Err(Error::invalid("select: give exactly one of lowest = N, highest = N, fraction = F"));
    }
    if let Some(f) = sel.fraction {
        if !(0.0..=1.0).contains(&f) {
            return Err(Error::invalid(format!("select: fraction = {f} is not in [0, 1]")));
        }
    }
    let highest = match (sel.highest, sel.from.as_deref()) {
        (Some(_), None) => true,
        (_, None | Some("lowest")) => false,
        (None, Some("highest")) if sel.fraction.is_some() => true,
        (_, Some(f)) => return Err(Error::invalid(format!("select: from = \"{f}\": expected \"lowest\" or \"highest\" (with fraction)"))),
    };
    if sel.per_group && kind != Kind::Head {
        return Err(Error::invalid("select: per_group applies to heads only"));
    }
    if (sel.per_layer || sel.per_group) && !matches!(kind, Kind::Head | Kind::Neuron) {
        return Err(Error::invalid("select: per_layer / per_group apply to heads and neurons"));
    }
    // Candidates grouped: all together, per layer, or per (layer, kv group).
    let mut groups: BTreeMap<(usize, usize), Vec<(Component, f64)>> = BTreeMap::new();
    for s in &step.findings.scores {
        let c = s.component;
        if c.kind() != kind || s.score.is_nan() {
            continue;
        }
        let layer = c.layer();
        if let (Some(ls), Some(l)) = (&sel.layers, layer) {
            if !ls.contains(&l) {
                continue;
            }
        }
        let group = match (c, sel.per_group, sel.per_layer) {
            (Component::Head { layer, head }, true, _) => {
                let li = ir.layers.get(layer).ok_or_else(|| Error::invalid(format!("select: {c} is not in this model")))?;
                (layer, li.kv_group(head))
            }
            (_, _, true) | (_, true, _) => (layer.unwrap_or(0), 0),
            _ => (0, 0),
        };
        groups.entry(group).or_default().push((c, s.score));
    }
    let mut chosen = vec![];
    for (_, mut v) in groups {
        v.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        if highest {
            v.reverse();
        }
        let n = match (sel.lowest, sel.highest, sel.fraction) {
            (Some(n), _, _) | (_, Some(n), _) => n,
            (_, _, Some(f)) => (f * v.len() as f64).round() as usize,
            _ => unreachable!("checked above"),
        };
        chosen.extend(v.into_iter().take(n).map(|x| x.0));
    }
    if chosen.is_empty() {
        return Err(Error::invalid(format!("select matched nothing in the `{}` findings ({kind:?} components{})", step.id, sel.layers.as_ref().map_or(String::new(), |l| format!(" in layers {l:?}")))));
    }
    chosen.sort();
    Ok(chosen)
}

/// The explicit pass option for a set of components of one kind.
fn as_option(chosen: &[Component]) -> Result<(&'static str, toml::Value)> {
    let strings = |v: Vec<String>| toml::Value::Array(v.into_iter().map(toml::Value::String).collect());
    match chosen[0].kind() {
        Kind::Block => Ok(("layers", toml::Value::Array(chosen.iter().filter_map(|c| c.layer()).map(|l| toml::Value::Integer(l as i64)).collect()))),
        Kind::Head => Ok(("heads", strings(chosen.iter().map(|c| c.to_string()).collect()))),
        Kind::Neuron => {
            let mut by_layer: BTreeMap<String, Vec<toml::Value>> = BTreeMap::new();
            for c in chosen {
                if let Component::Neuron { layer, n } = c {
                    by_layer.entry(layer.to_string()).or_default().push(toml::Value::Integer(*n as i64));
                }
            }
            Ok(("neurons", toml::Value::Table(by_layer.into_iter().map(|(k, v)| (k, toml::Value::Array(v))).collect())))
        }
        k => Err(Error::invalid(format!("select: {k:?} components are not pass targets (blocks, heads and neurons are)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Findings, LayerIr, Source};

    fn ir() -> Ir {
        let layer = LayerIr { heads: 6, kv_heads: 2, d_ff: 4, attn_params: 0, mlp_params: 0, norm_params: 0 };
        Ir {
            arch: "llama".into(),
            d_model: 8,
            d_head: 2,
            vocab: 10,
            tied: true,
            embed_params: 0,
            final_norm_params: 0,
            unembed_params: 0,
            layers: vec![layer; 2],
            directions: vec![],
        }
    }

    /// Heads scored so that within each (layer, group) the middle head is lowest, and layer 1's
    /// scores are all above layer 0's.
    fn step(kind: Kind) -> StepFindings {
        let mut f = Findings::new("m", "", Value::Null, Source::inline("model"), vec![]);
        for layer in 0..2 {
            for i in 0..6 {
                let score = (layer * 100 + [5, 1, 3, 6, 2, 4][i]) as f64;
                let c = if kind == Kind::Head { Component::Head { layer, head: i } } else { Component::Neuron { layer, n: i } };
                f.push(c, score);
            }
        }
        f.push(Component::Block(0), f64::NAN);
        StepFindings { id: "s".into(), method: "m".into(), options: serde_json::Value::Null, dir: "d".into(), sha256: "h".into(), cached: false, findings: f, seconds: 0.0 }
    }

    fn pick(kind: Kind, select: &str) -> Result<toml::Table> {
        let opts: toml::Table = toml::from_str(&format!("select = {select}")).unwrap();
        resolve(&opts, &[step(kind)], &ir()).map(|r| r.0)
    }

    fn heads(t: &toml::Table) -> Vec<&str> {
        t["heads"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect()
    }

    #[test]
    fn counts_fractions_and_groups() {
        let t = pick(Kind::Head, "{ by = \"s\", kind = \"head\", lowest = 2 }").unwrap();
        assert_eq!(heads(&t), ["L0.H1", "L0.H4"]);
        let t = pick(Kind::Head, "{ by = \"s\", kind = \"head\", highest = 1 }").unwrap();
        assert_eq!(heads(&t), ["L1.H3"]);
        // Per kv group (heads 0-2 and 3-5): the lowest of each.
        let t = pick(Kind::Head, "{ by = \"s\", kind = \"head\", lowest = 1, per_group = true }").unwrap();
        assert_eq!(heads(&t), ["L0.H1", "L0.H4", "L1.H1", "L1.H4"]);
        // Half of each layer, highest first; and a layer filter.
        let t = pick(Kind::Head, "{ by = \"s\", kind = \"head\", fraction = 0.5, from = \"highest\", per_layer = true, layers = [1] }").unwrap();
        assert_eq!(heads(&t), ["L1.H0", "L1.H3", "L1.H5"]);
        let t = pick(Kind::Neuron, "{ by = \"s\", kind = \"neuron\", lowest = 1, per_layer = true }").unwrap();
        assert_eq!(t["neurons"].to_string(), toml::Value::try_from(toml::toml! { 0 = [1] 1 = [1] }).unwrap().to_string());
        // NaN scores are never chosen; a kind must be named when several are scored.
        assert!(pick(Kind::Head, "{ by = \"s\", kind = \"block\", lowest = 1 }").unwrap_err().to_string().contains("matched nothing"));
        assert!(pick(Kind::Head, "{ by = \"s\", lowest = 1 }").unwrap_err().to_string().contains("kind = "));
        assert!(pick(Kind::Neuron, "{ by = \"s\", kind = \"neuron\", lowest = 1, per_group = true }").unwrap_err().to_string().contains("heads only"));
        assert!(pick(Kind::Head, "{ by = \"s\", kind = \"head\", fraction = 2.0 }").unwrap_err().to_string().contains("not in [0, 1]"));
    }

    /// `direction = { by, layer = 0.25 }` mixes the unit vectors of layers 0 and 1; integer layers
    /// name the file's tensor; fractions are refused where a file path is needed.
    #[test]
    fn a_fractional_layer_mixes_the_two_unit_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = ([3.0f32, 0.0, 0.0, 4.0], [0.0f32, 2.0, 0.0, 0.0]);
        let t = |v: [f32; 4]| candle_core::Tensor::new(&v, &candle_core::Device::Cpu).unwrap();
        crate::io::st::write(&dir.path().join("vectors.safetensors"), &[("v0".into(), t(a)), ("v1".into(), t(b))], &BTreeMap::new()).unwrap();
        let mut f = Findings::new("refusal-direction", "", Value::Null, Source::inline("model"), vec![]);
        for l in 0..2 {
            f.push(Component::Direction(l), 1.0).extra = BTreeMap::from([("layer".to_string(), json!(l)), ("tensor".to_string(), json!(format!("v{l}")))]);
        }
        f.summary.insert("best_tensor".into(), json!("v1"));
        let step = StepFindings { id: "r".into(), method: "refusal-direction".into(), options: Value::Null, dir: dir.path().into(), sha256: "h".into(), cached: false, findings: f, seconds: 0.0 };
        let at = |layer: &str| -> Result<toml::Value> {
            let opts: toml::Table = toml::from_str(&format!("direction = {{ by = \"r\"{layer} }}")).unwrap();
            resolve(&opts, std::slice::from_ref(&step), &ir()).map(|r| r.0["direction"].clone())
        };
        assert!(at("").unwrap().as_str().unwrap().ends_with("vectors.safetensors:v1"));
        assert!(at(", layer = 0").unwrap().as_str().unwrap().ends_with(":v0"));
        let mix: Vec<f64> = at(", layer = 0.25").unwrap().as_array().unwrap().iter().map(|x| x.as_float().unwrap()).collect();
        // 0.75·(0.6, 0, 0, 0.8) + 0.25·(0, 1, 0, 0), renormalised.
        let raw = [0.45, 0.25, 0.0, 0.6];
        let n = raw.iter().map(|x: &f64| x * x).sum::<f64>().sqrt();
        for (x, r) in mix.iter().zip(raw) {
            assert!((x - r / n).abs() < 1e-6, "{mix:?}");
        }
        assert!(at(", layer = 1.5").unwrap_err().to_string().contains("no vector at layer 2"));
        let e = direction(&FromDirection { by: "r".into(), layer: Some(0.5) }, std::slice::from_ref(&step)).unwrap_err();
        assert!(e.to_string().contains("a pass's direction only"), "{e}");
    }
}
