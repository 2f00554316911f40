-- wrk: POST a small chat completion request with the tier header.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-QLP-Tier"] = "T0"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("QLP_BENCH_KEY") or "none")
wrk.body = '{"model":"qlp-t0","messages":[{"role":"user","content":"Say ok."}],"max_tokens":8}'

-- QLP_BENCH_AGENT set: every request names that agent and one of 1,000 workflows, in turn (rollouts and
-- capture key on them; bench_learning.py).
local agent = os.getenv("QLP_BENCH_AGENT")
if agent then
  wrk.headers["X-QLP-Agent"] = agent
  local n = 0
  request = function()
    n = n + 1
    wrk.headers["X-QLP-Workflow-Id"] = "wf-" .. (n % 1000)
    return wrk.format()
  end
end
