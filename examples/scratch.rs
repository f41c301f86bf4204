use candle_core::{Device, Tensor};
use claw::model::{KvCache, Model};
fn main() -> anyhow::Result<()> {
    let model = Model::load(std::path::Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf"))?;
    let prompt = model.template.render(&[serde_json::json!({"role": "user", "content": "What is the capital of France?"})], None, true)?;
    let ids = model.tokenizer.encode(&prompt)?;
    use candle_core::quantized::GgmlDType as G;
    let q8 = model.decoder.convert_weights(G::Q8_0)?;
    let f16 = model.decoder.convert_weights(G::F16)?;
    let f32 = model.decoder.convert_weights(G::F32)?;
    let q4k = model.decoder.convert_weights(G::Q4_0)?;
    for (name, dec) in [("native", &model.decoder), ("q8_0", &q8), ("f16", &f16), ("f32", &f32), ("q4_0", &q4k), ("native", &model.decoder), ("q8_0", &q8)] {
        let mut cache = KvCache::new();
        let t0 = std::time::Instant::now();
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let mut l: Vec<f32> = dec.forward_last(&t, &mut cache)?.flatten_all()?.to_vec1()?;
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let mut out = vec![];
        for _ in 0..32 {
            let n = claw::model::sampling::argmax(&l) as u32;
            out.push(n);
            let t = Tensor::new(&[n], &Device::Cpu)?.unsqueeze(0)?;
            l = dec.forward_last(&t, &mut cache)?.flatten_all()?.to_vec1()?;
        }
        let dec_s = t1.elapsed().as_secs_f64();
        println!("{name}: prefill {:.1} tok/s decode {:.1} tok/s {:?}", ids.len() as f64 / prefill, 32.0 / dec_s, model.tokenizer.decode(&out[..8])?);
    }
    Ok(())
}
