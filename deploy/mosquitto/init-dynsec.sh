#!/bin/sh
# Create the dynamic-security file for the VPP broker: the dynsec admin, the roles `vpp-service`
# and `vpp-gateway`, and the service's (and optionally one gateway's) MQTT client.
#
# Devices are NOT created here: the service creates each device's client and role over MQTT
# ($CONTROL/dynamic-security/v1) at onboarding and deletes them at offboarding.
#
# Idempotent: an existing, non-empty file is left alone (FORCE=1 recreates it).
# Needs only the Mosquitto tools (mosquitto, mosquitto_ctrl), so it runs in the eclipse-mosquitto
# image as an init container. It starts a private broker on 127.0.0.1:$INIT_PORT to apply the
# roles with mosquitto_ctrl (the only way to get the plugin's own password hashing), then stops it.
#
# Environment:
#   DYNSEC_FILE             default /mosquitto/data/dynamic-security.json
#   DYNSEC_ADMIN_USER       default admin            (operators' dynsec admin, mosquitto_ctrl)
#   DYNSEC_ADMIN_PASSWORD   required
#   VPP_SERVICE_USER        default vpp-service      (VPP_MQTT_URL of vpp serve / vpp ingest)
#   VPP_SERVICE_PASSWORD    required
#   VPP_GATEWAY_USER        default vpp-gateway      (OEM gateway / fleet simulator)
#   VPP_GATEWAY_PASSWORD    optional: without it no gateway client is made (the role is)
#   VPP_TOPIC_ROOT          default vpp/v1           (must equal the service's VPP_TOPIC_ROOT)
#   INIT_PORT               default 18830            (private port of the temporary broker)
#   MOSQUITTO_DYNSEC_PLUGIN default: the first of the usual install paths that exists
set -eu

DYNSEC_FILE="${DYNSEC_FILE:-/mosquitto/data/dynamic-security.json}"
ADMIN_USER="${DYNSEC_ADMIN_USER:-admin}"
ADMIN_PASSWORD="${DYNSEC_ADMIN_PASSWORD:?set DYNSEC_ADMIN_PASSWORD}"
SERVICE_USER="${VPP_SERVICE_USER:-vpp-service}"
SERVICE_PASSWORD="${VPP_SERVICE_PASSWORD:?set VPP_SERVICE_PASSWORD}"
GATEWAY_USER="${VPP_GATEWAY_USER:-vpp-gateway}"
GATEWAY_PASSWORD="${VPP_GATEWAY_PASSWORD:-}"
ROOT="${VPP_TOPIC_ROOT:-vpp/v1}"
INIT_PORT="${INIT_PORT:-18830}"

if [ -s "$DYNSEC_FILE" ] && [ "${FORCE:-0}" != "1" ]; then
    echo "init-dynsec: $DYNSEC_FILE exists, leaving it alone (FORCE=1 to recreate)"
    exit 0
fi

PLUGIN="${MOSQUITTO_DYNSEC_PLUGIN:-}"
if [ -z "$PLUGIN" ]; then
    for candidate in /usr/lib/mosquitto_dynamic_security.so \
        /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so \
        /usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so \
        /usr/local/lib/mosquitto_dynamic_security.so; do
        if [ -f "$candidate" ]; then PLUGIN="$candidate"; break; fi
    done
fi
[ -n "$PLUGIN" ] || { echo "init-dynsec: dynamic-security plugin not found" >&2; exit 1; }

mkdir -p "$(dirname "$DYNSEC_FILE")"
rm -f "$DYNSEC_FILE"
mosquitto_ctrl dynsec init "$DYNSEC_FILE" "$ADMIN_USER" "$ADMIN_PASSWORD" >/dev/null

WORK="$(mktemp -d)"
BROKER_PID=""
cleanup() {
    if [ -n "$BROKER_PID" ]; then kill "$BROKER_PID" 2>/dev/null || true; wait "$BROKER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# `user` = whoever runs this, so the temporary broker can write the file it was given.
cat >"$WORK/init.conf" <<EOF
per_listener_settings false
allow_anonymous false
user $(id -un)
listener $INIT_PORT 127.0.0.1
plugin $PLUGIN
plugin_opt_config_file $DYNSEC_FILE
log_dest file $WORK/init.log
EOF
mosquitto -c "$WORK/init.conf" 2>>"$WORK/init.log" &
BROKER_PID=$!

# mosquitto_ctrl warns on stderr about the unencrypted (loopback) connection: keep its output
# quiet unless a command fails.
ctrl() {
    if ! mosquitto_ctrl -h 127.0.0.1 -p "$INIT_PORT" -u "$ADMIN_USER" -P "$ADMIN_PASSWORD" \
        dynsec "$@" >"$WORK/ctrl.out" 2>&1; then
        cat "$WORK/ctrl.out" >&2
        return 1
    fi
    if grep -qi "error" "$WORK/ctrl.out"; then
        cat "$WORK/ctrl.out" >&2
        return 1
    fi
}

tries=0
until ctrl getDefaultACLAccess 2>/dev/null; do
    tries=$((tries + 1))
    if [ "$tries" -ge 100 ]; then
        echo "init-dynsec: temporary broker did not answer" >&2
        cat "$WORK/init.log" >&2 || true
        exit 1
    fi
    sleep 0.1
done

# vpp-service: the service's own clients (API, ingest workers, event runner). Reads every
# device's telemetry/status/ack (alone or through an MQTT 5 shared subscription), publishes
# commands (and may clear a retained status under the topic root), and administers dynsec to
# create and delete device credentials.
ctrl createRole vpp-service
for kind in telemetry status ack; do
    ctrl addRoleACL vpp-service subscribePattern "$ROOT/devices/+/$kind" allow
    ctrl addRoleACL vpp-service subscribePattern "\$share/+/$ROOT/devices/+/$kind" allow
done
ctrl addRoleACL vpp-service publishClientSend "$ROOT/#" allow
ctrl addRoleACL vpp-service publishClientSend '$CONTROL/dynamic-security/#' allow
ctrl addRoleACL vpp-service publishClientReceive '$CONTROL/dynamic-security/#' allow
ctrl addRoleACL vpp-service subscribePattern '$CONTROL/dynamic-security/#' allow

# vpp-gateway: an OEM cloud or the fleet simulator speaking for many devices over a few
# connections. Publishes any device's telemetry/status/ack and receives any device's commands.
ctrl createRole vpp-gateway
for kind in telemetry status ack; do
    ctrl addRoleACL vpp-gateway publishClientSend "$ROOT/devices/+/$kind" allow
done
ctrl addRoleACL vpp-gateway subscribePattern "$ROOT/devices/+/cmd" allow
ctrl addRoleACL vpp-gateway subscribePattern "\$share/+/$ROOT/devices/+/cmd" allow

ctrl createClient "$SERVICE_USER" -p "$SERVICE_PASSWORD"
ctrl addClientRole "$SERVICE_USER" vpp-service
if [ -n "$GATEWAY_PASSWORD" ]; then
    ctrl createClient "$GATEWAY_USER" -p "$GATEWAY_PASSWORD"
    ctrl addClientRole "$GATEWAY_USER" vpp-gateway
fi

kill "$BROKER_PID"
wait "$BROKER_PID" 2>/dev/null || true
BROKER_PID=""

# The broker in the eclipse-mosquitto image drops root for the `mosquitto` user: let it write.
if [ "$(id -u)" = "0" ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto "$DYNSEC_FILE" "$(dirname "$DYNSEC_FILE")" 2>/dev/null || true
fi
echo "init-dynsec: wrote $DYNSEC_FILE (admin $ADMIN_USER, service $SERVICE_USER, topic root $ROOT)"
