-- wrk script for bench/ingest.py: signed WeChat plaintext text-message callbacks, a unique MsgId each.
-- WeChat's plaintext signature is sha1(sorted(token, timestamp, nonce)): it covers the query string,
-- not the body, so one signed query serves every request and only the XML body changes.
-- args: <path with signed query> <first MsgId> <repeat-customer pool size> [text|location]
-- location: location-report events, which the service acknowledges once durable; their CreateTime is
-- the id, so that each is a distinct event (WeChat's events carry no MsgId: sender + time name them).

local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local texts = {
  "你好,请问奶粉多少钱?",
  "有没有优惠券可以用",
  "I want to buy milk powder, what is the price",
  "不要奶粉了,谢谢",
  "今天天气不错,随便看看",
  "怎么买?我想下单两罐配方奶",
  "Do you have a coupon or discount?",
  "宝宝六个月,推荐什么辅食",
}

function init(args)
  path = args[1]
  base = tonumber(args[2])
  pool = tonumber(args[3])
  kind = args[4] or "text"
  tid = tonumber(tid) or 0
  headers = { ["Content-Type"] = "text/xml" }
end

function request()
  counter = counter + 1
  local id = base + tid * 100000000 + counter
  local openid
  if counter % 2 == 0 then
    openid = string.format("o_rep_%d", id % pool)        -- a returning customer
  else
    openid = string.format("o_new_%.0f", id)             -- a first-time customer
  end
  local body
  if kind == "location" then
    body = string.format(
      "<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName><FromUserName><![CDATA[%s]]></FromUserName>" ..
      "<CreateTime>%.0f</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[LOCATION]]></Event>" ..
      "<Latitude>23.137466</Latitude><Longitude>113.352425</Longitude><Precision>119.385040</Precision></xml>",
      openid, id)
  else
    body = string.format(
      "<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName><FromUserName><![CDATA[%s]]></FromUserName>" ..
      "<CreateTime>%d</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[%s %.0f]]></Content>" ..
      "<MsgId>%.0f</MsgId></xml>", openid, os.time(), texts[(counter % #texts) + 1], id, id)
  end
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  io.write(string.format(
    "BENCH_JSON {\"requests\": %d, \"duration_us\": %d, \"status_errors\": %d, \"connect_errors\": %d, " ..
    "\"read_errors\": %d, \"write_errors\": %d, \"timeouts\": %d, \"p50_us\": %d, \"p99_us\": %d}\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, latency:percentile(50), latency:percentile(99)))
end
