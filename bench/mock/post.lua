-- wrk: POST a small chat completion request with the tier header.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-QLP-Tier"] = "T0"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("QLP_BENCH_KEY") or "none")
wrk.body = '{"model":"qlp-t0","messages":[{"role":"user","content":"Say ok."}],"max_tokens":8}'
