//! Unit tests of the upstream client: request bodies, the documented response
//! shapes (OpenAI, llama.cpp, vLLM, SGLang), streamed chunks.

mod client {
    use super::super::*;

    fn upstream() -> Upstream {
        Upstream::connect(&UpstreamConfig {
            url: "http://127.0.0.1:9/v1/".into(),
            model: Some("m".into()),
            api_key: None,
            adapters: AdapterPush::None,
        })
        .unwrap()
    }

    #[test]
    fn the_base_url_drops_v1_and_slashes_and_needs_http() {
        assert_eq!(upstream().base(), "http://127.0.0.1:9");
        let err = Upstream::connect(&UpstreamConfig {
            url: "https://example.com".into(),
            model: Some("m".into()),
            api_key: None,
            adapters: AdapterPush::None,
        })
        .err()
        .unwrap();
        assert!(format!("{err}").contains("https://example.com"));
    }

    #[test]
    fn the_upstream_body_asks_for_logprobs_and_ids() {
        let mut fields = Map::new();
        fields.insert(
            "messages".into(),
            json!([{"role": "user", "content": "hi"}]),
        );
        fields.insert("temperature".into(), json!(0));
        fields.insert("max_tokens".into(), json!(7));
        let request = ChatRequest::from_body(&fields).unwrap();
        let body = upstream().chat_body(&request, 7, None);
        assert_eq!(body["model"], "m");
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
        assert_eq!(body["max_tokens"], 7);
        assert_eq!(body["stream"], false);
        assert_eq!(body["logprobs"], true);
        // llama.cpp computes no probabilities with n_probs 0.
        assert_eq!(body["top_logprobs"], 1);
        assert_eq!(body["return_token_ids"], true);
        assert_eq!(body["temperature"], 0.0);
        assert!(body.get("tools").is_none());
    }

    /// OpenAI's documented chat.completion: text and log-probs, no ids.
    #[test]
    fn openai_shape_has_no_ids() {
        let r = parse_chat_response(&json!({
            "id": "chatcmpl-1", "object": "chat.completion",
            "choices": [{"index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "logprobs": {"content": [{"token": "Hello", "logprob": -0.5, "bytes": [72], "top_logprobs": []}]},
                "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
        }))
        .unwrap();
        assert_eq!(r.content, "Hello");
        assert_eq!(r.completion_ids, None);
        assert_eq!(r.logprobs, None);
        assert_eq!(r.prompt_tokens, Some(9));
        assert_eq!(token_source(&r, false), TokenSource::UpstreamText);
    }

    /// llama.cpp's server (tools/server/server-task.cpp): each
    /// `logprobs.content` entry carries the token `id`.
    #[test]
    fn llama_cpp_shape_gives_completion_ids() {
        let r = parse_chat_response(&json!({
            "choices": [{"finish_reason": "stop", "index": 0,
                "message": {"role": "assistant", "content": "I"},
                "logprobs": {"content": [
                    {"id": 57, "token": "I", "bytes": [73], "logprob": -2.3,
                     "top_logprobs": [{"id": 57, "token": "I", "bytes": [73], "logprob": -2.3}]},
                    {"id": 2, "token": "", "bytes": [], "logprob": -0.1, "top_logprobs": []}
                ]}}],
            "usage": {"completion_tokens": 2, "prompt_tokens": 32, "total_tokens": 34}
        }))
        .unwrap();
        assert_eq!(r.completion_ids, Some(vec![57, 2]));
        assert_eq!(r.logprobs, Some(vec![-2.3, -0.1]));
        assert_eq!(r.prompt_ids, None);
        assert_eq!(token_source(&r, false), TokenSource::UpstreamText);
        let with_prompt = Reply {
            prompt_ids: Some(vec![1, 2]),
            ..r
        };
        assert_eq!(
            token_source(&with_prompt, false),
            TokenSource::UpstreamTokenize
        );
    }

    /// vLLM with `return_token_ids: true` (ChatCompletionResponse:
    /// `prompt_token_ids` at the top, `token_ids` per choice).
    #[test]
    fn vllm_shape_gives_prompt_and_completion_ids() {
        let r = parse_chat_response(&json!({
            "id": "chatcmpl-abc", "object": "chat.completion", "model": "Qwen/Qwen2.5-0.5B",
            "prompt_token_ids": [151644, 872, 198],
            "choices": [{"index": 0,
                "message": {"role": "assistant", "content": "Hi", "tool_calls": []},
                "logprobs": {"content": [
                    {"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": []},
                    {"token": "<|im_end|>", "logprob": -0.01, "bytes": [], "top_logprobs": []}
                ]},
                "finish_reason": "stop", "token_ids": [13048, 151645]}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        }))
        .unwrap();
        assert_eq!(r.prompt_ids, Some(vec![151644, 872, 198]));
        assert_eq!(r.completion_ids, Some(vec![13048, 151645]));
        assert_eq!(r.logprobs, Some(vec![-0.25, -0.01]));
        assert_eq!(token_source(&r, true), TokenSource::Upstream);
    }

    /// SGLang with `return_token_ids: true` (sgl-project/sglang#30917: per
    /// choice), with engine-parsed tool calls.
    #[test]
    fn sglang_choice_shape_and_tool_calls() {
        let r = parse_chat_response(&json!({
            "choices": [{"index": 0,
                "message": {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                "finish_reason": "tool_calls",
                "prompt_token_ids": [1, 2, 3], "token_ids": [7, 8, 9]}]
        }))
        .unwrap();
        assert_eq!(r.content, "");
        assert_eq!(r.tool_calls.len(), 1);
        assert_eq!(r.tool_calls[0].name, "get_weather");
        assert_eq!(r.tool_calls[0].arguments, "{\"city\": \"Paris\"}");
        assert_eq!(r.prompt_ids, Some(vec![1, 2, 3]));
        assert_eq!(r.completion_ids, Some(vec![7, 8, 9]));
        // No log-probs for these ids: none recorded rather than misaligned ones.
        assert_eq!(r.logprobs, None);
    }

    /// SGLang's response-level `sglext` (sgl-project/sglang#34488) and
    /// `meta_info.output_token_logprobs` triples `[logprob, id, text]`.
    #[test]
    fn sglang_sglext_and_meta_info_shapes() {
        let r = parse_chat_response(&json!({
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "length"}],
            "sglext": {"prompt_token_ids": [[5, 6]], "completion_token_ids": [[10, 11]]},
            "meta_info": {"output_token_logprobs": [[-0.5, 10, "o"], [-1.5, 11, "k"]]}
        }))
        .unwrap();
        assert_eq!(r.prompt_ids, Some(vec![5, 6]));
        assert_eq!(r.completion_ids, Some(vec![10, 11]));
        assert_eq!(r.logprobs, Some(vec![-0.5, -1.5]));
        assert_eq!(r.finish_reason, "length");
        let meta_only = parse_chat_response(&json!({
            "choices": [{"message": {"content": "ok"},
                "meta_info": {"output_token_logprobs": [[-0.5, 10, null], [-1.5, 11, null]]}}]
        }))
        .unwrap();
        assert_eq!(meta_only.completion_ids, Some(vec![10, 11]));
        assert_eq!(meta_only.logprobs, Some(vec![-0.5, -1.5]));
    }

    #[test]
    fn malformed_responses_are_errors_not_panics() {
        assert!(parse_chat_response(&json!({})).is_err());
        assert!(parse_chat_response(&json!({"choices": []})).is_err());
        assert!(parse_chat_response(&json!({"choices": [{"message": {"content": 3}}]})).is_err());
        // Negative or huge "ids" are not ids.
        let r = parse_chat_response(&json!({"choices": [{"message": {"content": "x"},
            "token_ids": [-1, 99999999999u64]}]}))
        .unwrap();
        assert_eq!(r.completion_ids, None);
    }
}

mod stream {
    use super::super::*;

    /// llama-server's chunks (role first, one token per chunk with its
    /// `logprobs.content[].id`, then the finish and the usage chunk).
    #[test]
    fn llama_cpp_chunks_fold_into_one_reply() {
        let mut fold = ChunkFold::default();
        let chunks = [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": null}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "I"}, "finish_reason": null,
                "logprobs": {"content": [{"id": 57, "token": "I", "bytes": [73], "logprob": -2.3, "top_logprobs": []}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "'m"}, "finish_reason": null,
                "logprobs": {"content": [{"id": 5248, "token": "'m", "bytes": [39, 109], "logprob": -0.17, "top_logprobs": []}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 32, "completion_tokens": 2, "total_tokens": 34}}),
        ];
        let pieces: Vec<String> = chunks.iter().map(|c| fold.add(c)).collect();
        assert_eq!(pieces, ["", "I", "'m", "", ""]);
        let r = parse_chat_response(&fold.response()).unwrap();
        assert_eq!(r.content, "I'm");
        assert_eq!(r.completion_ids, Some(vec![57, 5248]));
        assert_eq!(r.logprobs, Some(vec![-2.3, -0.17]));
        assert_eq!(r.finish_reason, "length");
        assert_eq!(r.prompt_tokens, Some(32));
        assert_eq!(r.prompt_ids, None);
    }

    /// vLLM streams `token_ids` per chunk and `prompt_token_ids` in the first.
    #[test]
    fn vllm_chunks_carry_ids() {
        let mut fold = ChunkFold::default();
        for c in [
            json!({"prompt_token_ids": [1, 2], "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "token_ids": []}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "Hi"}, "token_ids": [13048],
                "logprobs": {"content": [{"token": "Hi", "logprob": -0.25, "top_logprobs": []}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": ""}, "token_ids": [151645], "finish_reason": "stop",
                "logprobs": {"content": [{"token": "", "logprob": -0.01, "top_logprobs": []}]}}]}),
        ] {
            fold.add(&c);
        }
        let r = parse_chat_response(&fold.response()).unwrap();
        assert_eq!(r.prompt_ids, Some(vec![1, 2]));
        assert_eq!(r.completion_ids, Some(vec![13048, 151645]));
        assert_eq!(r.logprobs, Some(vec![-0.25, -0.01]));
        assert_eq!(token_source(&r, true), TokenSource::Upstream);
    }
}

mod adapters {
    use super::super::*;
    use crate::serve::push::{applied, peft_dir, EngineLora};

    fn upstream(adapters: AdapterPush) -> Upstream {
        Upstream::connect(&UpstreamConfig {
            url: "http://127.0.0.1:9".into(),
            model: Some("base".into()),
            api_key: None,
            adapters,
        })
        .unwrap()
    }

    fn request() -> ChatRequest {
        let mut fields = Map::new();
        fields.insert(
            "messages".into(),
            json!([{"role": "user", "content": "hi"}]),
        );
        ChatRequest::from_body(&fields).unwrap()
    }

    /// vLLM serves a loaded adapter as a model of its own name
    /// (serving_models.py: the adapter's `lora_name` is a model card).
    #[test]
    fn vllm_requests_name_the_adapter_as_model() {
        let body = upstream(AdapterPush::Vllm).chat_body(&request(), 5, Some("claw-000003-1"));
        assert_eq!(body["model"], "claw-000003-1");
        assert!(body.get("lora_path").is_none());
        let base = upstream(AdapterPush::Vllm).chat_body(&request(), 5, None);
        assert_eq!(base["model"], "base");
    }

    /// SGLang: the base model as `model`, the adapter as `lora_path`.
    #[test]
    fn sglang_requests_carry_lora_path() {
        let body = upstream(AdapterPush::Sglang).chat_body(&request(), 5, Some("claw-000003-1"));
        assert_eq!(body["model"], "base");
        assert_eq!(body["lora_path"], "claw-000003-1");
    }

    /// llama.cpp applies its adapters to every request: nothing to name.
    #[test]
    fn llama_cpp_requests_are_unchanged() {
        let body = upstream(AdapterPush::LlamaCpp).chat_body(&request(), 5, Some("x"));
        assert_eq!(body["model"], "base");
        assert!(body.get("lora_path").is_none() && body.get("lora").is_none());
    }

    fn lora(id: i64, path: &str, scale: f64) -> EngineLora {
        EngineLora {
            id,
            path: path.into(),
            scale,
        }
    }

    #[test]
    fn the_applied_version_is_the_enabled_claw_adapter() {
        assert_eq!(applied(&[]), (0, None, None));
        let (v, p, note) = applied(&[
            lora(0, "/c/adapter-000004.gguf", 0.0),
            lora(1, "/c/adapter-000007.gguf", 1.0),
        ]);
        assert_eq!((v, p), (7, Some("/c/adapter-000007.gguf".into())));
        assert!(note.is_none());
        // Loaded but scaled to 0: the base model.
        assert_eq!(applied(&[lora(0, "/c/adapter-000004.gguf", 0.0)]).0, 0);
        // Not claw's, or two at once: version 0, said so.
        let (v, _, note) = applied(&[lora(0, "/x/style.gguf", 1.0)]);
        assert_eq!(v, 0);
        assert!(note.unwrap().contains("/x/style.gguf"));
        let (v, _, note) = applied(&[
            lora(0, "/c/adapter-000004.gguf", 1.0),
            lora(1, "/c/adapter-000007.gguf", 0.5),
        ]);
        assert_eq!(v, 0);
        assert!(note.unwrap().contains("2 adapters"));
    }

    #[test]
    fn a_peft_directory_holds_the_weights_and_peft_keys_only() {
        let dir = tempfile::tempdir().unwrap();
        let adapter = dir.path().join("adapter-000002.safetensors");
        std::fs::write(&adapter, b"weights").unwrap();
        std::fs::write(
            dir.path().join("adapter-000002.json"),
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                "claw_step": 2, "claw_metrics": {"loss": 1}}"#,
        )
        .unwrap();
        let out = peft_dir(&adapter, &dir.path().join("peft")).unwrap();
        assert_eq!(out, dir.path().join("peft/adapter-000002"));
        assert_eq!(
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
            b"weights"
        );
        let config: Json =
            serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["r"], 4);
        assert_eq!(config["target_modules"], json!(["q_proj"]));
        assert!(config.get("claw_step").is_none() && config.get("claw_metrics").is_none());
        // Again (a retry): replaced, not refused.
        peft_dir(&adapter, &dir.path().join("peft")).unwrap();
    }
}
