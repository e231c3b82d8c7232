#!/bin/bash
# The README's curl walk-through, end to end: keys, `erasus-ray serve` (local Ray Serve, wine, SQLite in a temp dir), a
# deletion polled to verified, predict on the new version, the audit export, a rollback that reopens the request.
# Run from anywhere with erasus-ray installed (about a minute; stops the server it started by its PID).
set -u
cd "$(mktemp -d)"
echo "## cwd $PWD"
KEY=$(erasus-ray serve keys add client-0)
OP=$(erasus-ray serve keys add operator --role operator)
echo "## key: ${KEY:0:16}..."
erasus-ray serve > serve.log 2>&1 &
SERVER=$!
for i in $(seq 240); do curl -s -o /dev/null http://127.0.0.1:8321/v1/model && break; sleep 1; done
H="Authorization: Bearer $KEY"
J='content-type: application/json'
URL=http://127.0.0.1:8321
echo '$ curl -s $URL/v1/model'; curl -s $URL/v1/model; echo
echo '$ curl -s $URL/v1/ownership -H "$H"'; curl -s $URL/v1/ownership -H "$H" | cut -c1-80; echo
echo '$ predict'; curl -s -X POST $URL/predict -H "$H" -H "$J" -d '{"inputs": [[1.519, -0.562, 0.232, -1.17, 1.914, 0.809, 1.035, -0.66, 1.225, 0.252, 0.362, 1.848, 1.013]]}'; echo
echo '$ delete'; curl -s -X POST $URL/v1/deletions -H "$H" -H "$J" -d '{"request_id": "my-first", "ids": [2, 8, 15, 22, 29, 33, 40, 46, 51, 62]}'; echo
echo '$ someone elses'; curl -s -X POST $URL/v1/deletions -H "$H" -H "$J" -d '{"request_id": "grab", "ids": [2, 3]}'; echo
for i in $(seq 120); do S=$(curl -s $URL/v1/deletions/my-first -H "$H"); echo "$S" | grep -q '"state":"\(verified\|failed\)"' && break; sleep 1; done
echo '$ status'; echo "$S" | python -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({k: d[k] for k in ('request_id','state','state_reason','model_version')})); print([t['to'] for t in d['history']]); print(d['metrics']['verification'].get('steps'), d['metrics']['verification'].get('power',{}).get('statement'))"
echo '$ predict again'; curl -s -X POST $URL/predict -H "$H" -H "$J" -d '{"inputs": [[1.519, -0.562, 0.232, -1.17, 1.914, 0.809, 1.035, -0.66, 1.225, 0.252, 0.362, 1.848, 1.013]]}'; echo
echo '$ audit'; curl -s "$URL/v1/audit/export?hash_ids=true" -H "Authorization: Bearer $OP" | wc -l
echo '$ rollback'; curl -s -X POST $URL/v1/model/rollback -H "Authorization: Bearer $OP"; echo
echo '$ rollback by client'; curl -s -X POST $URL/v1/model/rollback -H "$H"; echo
kill -TERM $SERVER; wait $SERVER; echo "## server exit $?"
tail -3 serve.log
