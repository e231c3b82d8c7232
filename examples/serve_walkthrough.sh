#!/bin/bash
# The README's curl walk-through, end to end: keys, `erasus-ray serve` (local Ray Serve, digits, SQLite in a temp dir), a
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
# the first test digit (a "1"), 8x8 pixels scaled to [0, 1]
X='{"inputs": [[0, 0, 0, 0.12, 1, 1, 0.12, 0, 0, 0, 0, 0.25, 1, 1, 0.12, 0, 0, 0.06, 0.25, 0.75, 1, 0.75, 0, 0, 0, 0.44, 1, 1, 1, 0.75, 0, 0, 0, 0, 0.19, 0.62, 1, 0.88, 0, 0, 0, 0, 0, 0.5, 1, 0.75, 0, 0, 0, 0, 0, 0.38, 1, 1, 0.12, 0, 0, 0, 0, 0.12, 0.75, 0.94, 0.25, 0]]}'
URL=http://127.0.0.1:8321
echo '$ curl -s $URL/v1/model'; curl -s $URL/v1/model; echo
echo '$ curl -s $URL/v1/ownership -H "$H"'; curl -s $URL/v1/ownership -H "$H" | cut -c1-80; echo
echo '$ predict'; curl -s -X POST $URL/predict -H "$H" -H "$J" -d "$X"; echo
echo '$ delete'; curl -s -X POST $URL/v1/deletions -H "$H" -H "$J" -d '{"request_id": "my-first", "ids": [0, 4, 8, 12, 16, 20, 26, 31, 38, 44]}'; echo
echo '$ someone elses'; curl -s -X POST $URL/v1/deletions -H "$H" -H "$J" -d '{"request_id": "grab", "ids": [0, 1]}'; echo
for i in $(seq 120); do S=$(curl -s $URL/v1/deletions/my-first -H "$H"); echo "$S" | grep -q '"state":"\(verified\|failed\)"' && break; sleep 1; done
echo '$ status'; echo "$S" | python -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({k: d[k] for k in ('request_id','state','state_reason','model_version')})); print([t['to'] for t in d['history']]); print(d['metrics']['verification'].get('steps'), d['metrics']['verification'].get('power',{}).get('statement'))"
echo '$ predict again'; curl -s -X POST $URL/predict -H "$H" -H "$J" -d "$X"; echo
echo '$ audit'; curl -s "$URL/v1/audit/export?hash_ids=true" -H "Authorization: Bearer $OP" | wc -l
echo '$ rollback'; curl -s -X POST $URL/v1/model/rollback -H "Authorization: Bearer $OP"; echo
echo '$ rollback by client'; curl -s -X POST $URL/v1/model/rollback -H "$H"; echo
kill -TERM $SERVER; wait $SERVER; echo "## server exit $?"
tail -3 serve.log
