-- wrk: POST one chat completion per request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
wrk.body = '{"model": "MODEL", "messages": [{"role": "user", "content": "Say ok."}], "max_tokens": 5}'
