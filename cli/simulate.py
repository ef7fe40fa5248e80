"""``vpp simulate``: a simulated fleet on the command line (heavy imports stay inside)."""

from __future__ import annotations

import os

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def simulate(
        devices: int = typer.Option(1000, "--devices", "-n", help="number of devices", min=1),
        regions: str = typer.Option(
            None, help="comma-separated regions (default: the first of VPP_REGIONS)"
        ),
        interval_s: float = typer.Option(
            None, "--interval-s", help="telemetry cadence in service seconds (default 300)"
        ),
        seed: int = typer.Option(0, help="random seed (the same seed gives the same fleet)"),
        id_prefix: str = typer.Option(None, help="device id prefix (default sim<seed>)"),
        api_url: str = typer.Option(None, help="API base URL (default http://VPP_API_HOST:PORT)"),
        api_key: str = typer.Option(
            None, help="fleet API key for onboarding (default $VPP_API_KEY)"
        ),
        credentials_file: str = typer.Option(
            None,
            help="JSON file of device credentials: read if it exists (no onboarding), "
            "written after onboarding otherwise",
        ),
        no_onboard: bool = typer.Option(
            False, "--no-onboard", help="skip onboarding (devices registered elsewhere)"
        ),
        mqtt_url: str = typer.Option(None, help="broker URL (default VPP_MQTT_URL)"),
        gateway_password: str = typer.Option(
            None, help="password of the vpp-gateway login (default $VPP_GATEWAY_PASSWORD)"
        ),
        gateways: int = typer.Option(2, help="gateway connections publishing for the fleet"),
        per_device_connections: bool = typer.Option(
            False,
            "--per-device-connections",
            help="one MQTT connection per device, with its own login and Last Will "
            "(small fleets only)",
        ),
        tick_s: float = typer.Option(15.0, help="physics step in service seconds"),
        never_answer: float = typer.Option(0.02, help="share of devices that never answer"),
        opt_out_2h: float = typer.Option(
            0.10, help="share of thermostat customers overriding by 2 h into an event"
        ),
        self_consumption: float = typer.Option(
            1.0, help="share of batteries in self-consumption (the rest idle in backup mode)"
        ),
        drop_fraction: float = typer.Option(0.0, help="fault: share of devices that drop off"),
        drop_at_s: float = typer.Option(
            None, help="fault: when they drop, service seconds after the start"
        ),
        vendor_outage: str = typer.Option(None, help="fault: a vendor whose cloud goes down"),
        vendor_outage_at_s: float = typer.Option(
            None, help="fault: when the vendor goes down, service seconds after the start"
        ),
        malformed_per_min: float = typer.Option(0.0, help="fault: malformed messages a minute"),
        oversized_per_min: float = typer.Option(
            0.0, help="fault: oversized (> 4 KiB) messages a minute"
        ),
        out_of_order_per_min: float = typer.Option(
            0.0, help="fault: out-of-order (older seq and ts) messages a minute"
        ),
        skew_fraction: float = typer.Option(0.0, help="fault: share of devices with bad clocks"),
        skew_s: float = typer.Option(
            -600.0, help="fault: their clock offset in seconds (negative: behind)"
        ),
        duration_s: float = typer.Option(
            None, help="stop after this many service seconds (default: run until Ctrl-C)"
        ),
    ) -> None:
        """A simulated fleet that onboards itself, publishes telemetry and obeys commands.

        It reads credentials from --credentials-file when that file exists, and runs on the
        service clock (VPP_TIME_SCALE, VPP_TIME_ORIGIN: give both processes the same values).

        Example: VPP_TIME_SCALE=60 VPP_TIME_ORIGIN=1784050000000 vpp simulate --devices 2000
        --regions ERCOT-NORTH --api-key $KEY --drop-fraction 0.1 --drop-at-s 3600
        """
        import asyncio
        import json
        import logging
        import signal

        from sim.simulator import FaultPlan, FleetSimulator
        from vpp.settings import get_settings

        settings = get_settings()
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        region_list = [r.strip() for r in regions.split(",") if r.strip()] if regions else None
        gw_password = gateway_password or os.environ.get("VPP_GATEWAY_PASSWORD")
        try:
            sim = FleetSimulator(
                settings,
                devices,
                region_list,
                interval_s,
                api_url=api_url,
                api_key=api_key or os.environ.get("VPP_API_KEY"),
                credentials_file=credentials_file,
                seed=seed,
                mqtt_url=mqtt_url,
                gateway_username="vpp-gateway" if gw_password else None,
                gateway_password=gw_password,
                gateways=gateways,
                per_device_connections=per_device_connections,
                tick_s=tick_s,
                id_prefix=id_prefix,
                faults=FaultPlan(
                    malformed_per_min=malformed_per_min,
                    oversized_per_min=oversized_per_min,
                    out_of_order_per_min=out_of_order_per_min,
                    skew_fraction=skew_fraction,
                    skew_s=skew_s,
                    drop_fraction=drop_fraction,
                    drop_at_s=drop_at_s,
                    vendor_outage=vendor_outage,
                    vendor_outage_at_s=vendor_outage_at_s,
                ),
                fleet_options={
                    "never_answer_share": never_answer,
                    "opt_out_at_2h": opt_out_2h,
                    "self_consumption_share": self_consumption,
                },
            )
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

        async def go() -> None:
            if not no_onboard:
                n = await sim.onboard()
                typer.echo(f"onboarded {n} devices", err=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, stop.set)
                except (NotImplementedError, RuntimeError):
                    pass
            if duration_s is not None:
                loop.call_later(sim.clock.wall_seconds(duration_s), stop.set)
            await sim.run(stop)

        try:
            asyncio.run(go())
        except (RuntimeError, ConnectionError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        truth = sim.ground_truth()
        typer.echo(
            json.dumps(
                {
                    **sim.summary(),
                    "batteries_below_reserve": truth.batteries_below_reserve,
                    "still_under_command": len(truth.under_command),
                    "opted_out": truth.opted_out,
                }
            )
        )
