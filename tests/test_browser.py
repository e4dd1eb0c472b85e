"""The visualisation notebooks as a reader meets them: JupyterLab in headless Chromium.

JupyterLab starts headless on a free port with a token, on copies of the notebooks (JupyterLab saves what it runs);
Chromium, driven by selenium through Debian's chromedriver, opens them, runs all cells, fails on any error output or
a figure shown as `<Figure ...>` text, checks that pictures show at their own size, then operates the explorer's
controls (query, view, tab, episode, Grad-CAM) and checks that the pictures change. It prints what it clicked and
what changed, with the time each answer took, and saves screenshots under tests/artifacts/browser/.

Needs `apt-get install -y chromium chromium-driver` and `pip install selenium`. Skip it with `-m "not browser"`;
without a browser it is skipped, except in CI (MDMF_CI=1), where a missing browser is a failure.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / 'tests' / 'artifacts' / 'browser'
CHROMIUM, CHROMEDRIVER = shutil.which('chromium') or '/usr/bin/chromium', '/usr/bin/chromedriver'
# run all; the explorer's controls are operated in the second
NOTEBOOKS = ('22_plots.ipynb', '23_explorer.ipynb')

pytestmark = pytest.mark.browser
LOG = ARTIFACTS / 'log.txt'  # what the test printed: CI shows it after the suite


def say(*parts, **kw):
    "Print a line of the test's story and keep it in tests/artifacts/browser/log.txt."
    kw.pop('flush', None)
    line = ' '.join(str(p) for p in parts)
    print(line, flush=True, **kw)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG, 'a', encoding='utf-8') as f:
        f.write(line + '\n')


def _missing() -> str:
    if not Path(CHROMIUM).exists():
        return 'chromium is not installed (apt-get install -y chromium chromium-driver)'
    if not Path(CHROMEDRIVER).exists():
        return f'{CHROMEDRIVER} is missing (apt-get install -y chromium-driver)'
    try:
        import selenium  # noqa: F401  (only whether it is there)
    except ImportError:
        return 'selenium is not installed (pip install selenium)'
    return ''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "JupyterLab on copies of the notebooks: yields (base url, token); stopped and cleaned up after."
    why = _missing()
    if why:
        if os.environ.get('MDMF_CI'):
            pytest.fail(f'the browser test must run in CI: {why}')
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp('lab')
    work, settings = tmp / 'nbs', tmp / 'settings' / '@jupyterlab' / 'apputils-extension'
    work.mkdir()
    settings.mkdir(parents=True)
    for name in NOTEBOOKS:
        shutil.copy(ROOT / 'nbs' / name, work / name)
    (settings / 'notification.jupyterlab-settings').write_text(
        json.dumps(dict(fetchNews='false', checkForUpdates=False))
    )
    tracker = tmp / 'settings' / '@jupyterlab' / 'notebook-extension'
    tracker.mkdir(parents=True)
    # every cell in the page
    (tracker / 'tracker.jupyterlab-settings').write_text(json.dumps(dict(windowingMode='none')))
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
        'JUPYTERLAB_SETTINGS_DIR': str(tmp / 'settings'),
        'JUPYTERLAB_WORKSPACES_DIR': str(tmp / 'workspaces'),
        'OMP_NUM_THREADS': '1',
    }
    log = open(tmp / 'jupyter.log', 'w')
    server = subprocess.Popen(
        [
            sys.executable,
            '-m',
            'jupyterlab',
            '--no-browser',
            '--allow-root',
            f'--port={port}',
            '--ip=127.0.0.1',
            f'--ServerApp.token={token}',
            f'--ServerApp.root_dir={work}',
            '--LabApp.expose_app_in_browser=True',
            '--ServerApp.disable_check_xsrf=False',
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            pytest.fail('JupyterLab did not answer within 60 s')
        if server.poll() is not None:
            pytest.fail('JupyterLab stopped: ' + (tmp / 'jupyter.log').read_text()[-2000:])
        yield url, token
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope='module')
def browser(lab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    user_data = Path(os.environ.get('TMPDIR', '/tmp')) / f'mdmf-chromium-{secrets.token_hex(4)}'
    for flag in (
        '--headless=new',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--no-first-run',
        '--disable-dev-shm-usage',
        f'--user-data-dir={user_data}',
        '--window-size=1400,1000',
        '--force-device-scale-factor=1',
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(user_data, ignore_errors=True)


def _wait(cond, timeout: float, what: str, poll: float = 0.05):
    "Poll `cond()` until it is truthy; returns (its value, seconds waited)."
    t0 = time.perf_counter()
    while True:
        v = cond()
        if v:
            return v, time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f'waited {timeout} s for {what}')
        time.sleep(poll)


_STATE = '''
const app = window.jupyterapp;
if (!app) return null;
let w = null;
for (const x of app.shell.widgets('main')) if (x.context && x.context.path === arguments[0]) w = x;
if (!w || !w.content || !w.content.model || !w.sessionContext || !w.sessionContext.session) return null;
const k = w.sessionContext.session.kernel, cells = w.content.model.cells, out = [];
for (let i = 0; i < cells.length; i++) {
  const c = cells.get(i);
  if (c.type === 'code') out.push({source: c.sharedModel.getSource(), count: c.executionCount, outputs: c.outputs.toJSON()});
}
return {path: w.context.path, kernel: k ? k.status : null, cells: out};
'''

_IMAGES = '''
return Array.from(document.querySelectorAll(arguments[0])).filter(i => i.offsetParent !== null && i.naturalWidth > 0)
  .map(i => [i.naturalWidth, i.naturalHeight, Math.round(i.getBoundingClientRect().width), i.className]);
'''


def _state(driver, name: str) -> dict:
    return driver.execute_script(_STATE, name)


def _figure_text(out: dict) -> bool:
    data = out.get('data', {})
    text = ''.join(data.get('text/plain', ''))
    return text.startswith('<Figure') and not any(k.startswith('image/') for k in data)


def run_all(driver, url: str, token: str, name: str, timeout: float = 420) -> dict:
    "Open notebook `name` in JupyterLab, run all cells, wait for the end; returns the notebook's state."
    driver.get(f'{url}/lab/tree/{name}?token={token}')
    try:
        _wait(lambda: (s := _state(driver, name)) and s['kernel'] == 'idle', 120, f'{name} to open')
    except AssertionError:
        driver.save_screenshot(str(ARTIFACTS / f'{name[:2]}-failed-to-open.png'))
        seen = driver.execute_script(
            "return window.jupyterapp ? Array.from(window.jupyterapp.shell.widgets('main'))"
            ".map(w => w.title.label) : 'no window.jupyterapp'"
        )
        raise AssertionError(
            f'{name} did not open with an idle kernel (open in the main area: {seen}); see {ARTIFACTS}'
        ) from None
    driver.execute_script(
        "const o = document.querySelector('.jp-OutputArea-output img, .jp-OutputArea-output "
        ".jupyter-widgets, .jp-OutputArea-output .lm-Widget'); if (o) o.scrollIntoView()"
    )
    driver.save_screenshot(str(ARTIFACTS / f'{name[:2]}-0-opened.png'))  # the stored outputs, before running
    stored = [e.text for e in driver.find_elements('css selector', '.jp-OutputArea-output')]
    say(
        f'{name}: opened; {len(stored)} stored outputs shown'
        + ''.join(f'; one reads "{t[:80]}"' for t in stored if 'Error' in t),
        flush=True,
    )
    t0 = time.perf_counter()
    driver.execute_script(
        '''const app = window.jupyterapp;
      for (const x of app.shell.widgets('main')) if (x.context && x.context.path === arguments[0]) app.shell.activateById(x.id);
      // Not returned: WebDriver would wait on the promise, which settles only when every cell has run.
      app.commands.execute('notebook:run-all-cells').catch(e => { window.__runAllError = String(e); });''',
        name,
    )
    idle_since = None
    while time.perf_counter() - t0 < timeout:
        failed = driver.execute_script('return window.__runAllError || null')
        assert failed is None, f'{name}: Run All failed in JupyterLab: {failed}'
        s = _state(driver, name)
        code = [c for c in s['cells'] if c['source'].strip()]
        errors = [o for c in code for o in c['outputs'] if o['output_type'] == 'error']
        done = all(c['count'] is not None for c in code)
        idle_since = (idle_since or time.perf_counter()) if s['kernel'] == 'idle' else None
        if s['kernel'] == 'idle' and (done or errors) and time.perf_counter() - idle_since > 1.5:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f'{name}: Run All did not finish within {timeout} s')
    say(f'{name}: Run All finished in {time.perf_counter() - t0:.0f} s', flush=True)
    driver.save_screenshot(str(ARTIFACTS / f'{name[:2]}-1-ran.png'))
    return s


def check_outputs(driver, name: str, s: dict) -> int:
    "No error, no figure as text, every cell run, pictures shown unshrunk; returns the number of pictures."
    errors = [
        f"{o['ename']}: {o['evalue']}"
        for c in s['cells']
        for o in c['outputs']
        if o['output_type'] == 'error'
    ]
    assert not errors, f'{name}: error outputs after Run All: {errors}'
    assert not [c for c in s['cells'] if c['source'].strip() and c['count'] is None], (
        f'{name}: cells left unrun'
    )
    texts = [o for c in s['cells'] for o in c['outputs'] if _figure_text(o)]
    assert not texts, f'{name}: figures shown as text: {texts[:2]}'
    shown = [e.text for e in driver.find_elements('css selector', '.jp-OutputArea-output')]
    assert not [t for t in shown if '<Figure' in t], f'{name}: an output shows "<Figure" text'
    images = driver.execute_script(_IMAGES, '.jp-OutputArea-output img')
    assert images, f'{name}: no picture is shown'
    shrunk = [i for i in images if i[2] < i[0] - 1]
    assert not shrunk, f'{name}: pictures shown smaller than their own size (natural, shown): {shrunk}'
    say(
        f'{name}: {len(images)} pictures shown, none shrunk; widths {sorted({i[0] for i in images})} px',
        flush=True,
    )
    return len(images)


class Explorer:
    "The explorer's controls and pictures in the page, found by their CSS classes (see mdmf.explorer)."

    def __init__(self, driver):
        self.d = driver

    def el(self, css: str):
        e = self.d.find_element('css selector', f'.mdmf-explorer {css}')
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", e)
        return e

    def src(self, kind: str) -> tuple:  # (the picture's blob URL, whether it is on screen)
        return tuple(
            self.d.execute_script(
                "const i = document.querySelector(arguments[0]); return i ? [i.src, i.offsetParent !== null] : ['', false]",
                f'.mdmf-explorer img.mdmf-img-{kind}',
            )
        )

    def status(self) -> str:
        return self.el('.mdmf-status').text

    def act(self, step: str, action, watch: list, expect: str = '', timeout: float = 60) -> float:
        "Do `action`, wait until every picture in `watch` changed (and the status says `expect`); print, screenshot."
        before = {k: self.src(k)[0] for k in watch}
        t0 = time.perf_counter()
        action()
        changed = lambda k: (lambda src, shown: shown and src and src != before[k])(*self.src(k))
        _wait(
            lambda: all(changed(k) for k in watch) and expect in self.status(),
            timeout,
            f'{step}: {watch} to change',
        )
        seconds = time.perf_counter() - t0
        drawn = self.status().rsplit('drawn in ', 1)[-1]
        say(
            f'{step}: {", ".join(watch)} changed after {seconds:.2f} s in the browser (kernel: drawn in {drawn}); '
            f'status: {self.status()[:110]}',
            flush=True,
        )
        self.d.save_screenshot(str(ARTIFACTS / f'20-{step.split(":")[0]}.png'))
        return seconds


def test_visualisation_notebooks_in_jupyterlab(lab, browser):
    LOG.unlink(missing_ok=True)  # this run's story only
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    url, token = lab
    pictures = {name: check_outputs(browser, name, run_all(browser, url, token, name)) for name in NOTEBOOKS}
    ex = Explorer(browser)
    _wait(lambda: ex.src('query')[1], 30, 'the explorer')
    tab = lambda title: [
        t
        for t in browser.find_elements('css selector', '.mdmf-explorer .mdmf-tabs .lm-TabBar-tab')
        if t.text.strip() == title
    ][0]
    view = lambda: next(
        b.text
        for b in browser.find_elements('css selector', '.mdmf-explorer .mdmf-view button')
        if 'mod-active' in b.get_attribute('class')
    )
    times = {}
    times['1-tab'] = ex.act(
        '1-tab: clicked the "prediction" tab', lambda: tab('prediction').click(), ['prediction']
    )
    select = Select(ex.el('.mdmf-query select'))
    q = (next(i for i, o in enumerate(select.options) if o.is_selected()) + 1) % len(select.options)
    times['2-query'] = ex.act(
        f'2-query: chose query {q}', lambda: select.select_by_index(q), ['query', 'prediction'], f'query {q}:'
    )
    other = next(
        b
        for b in browser.find_elements('css selector', '.mdmf-explorer .mdmf-view button')
        if b.text != view()
    )
    label = other.text
    times['3-view'] = ex.act(f'3-view: clicked the view "{label}"', other.click, ['prediction'])
    assert view() == label
    times['4-otam'] = ex.act('4-otam: clicked the "OTAM" tab', lambda: tab('OTAM').click(), ['otam'])
    box = ex.el('.mdmf-episode input')
    n = int(box.get_attribute('value')) + 1

    def episode():
        box.send_keys(Keys.CONTROL, 'a')
        box.send_keys(str(n), Keys.ENTER)

    times['5-episode'] = ex.act(f'5-episode: typed episode {n}', episode, ['query', 'otam'], f'episode {n}')
    button = ex.el('button.mdmf-gradcam')
    busy = []

    def gradcam():
        button.click()
        try:
            busy.append(_wait(lambda: 'computing' in button.text, 5, 'the busy state', 0.01)[0])
        except AssertionError:
            pass

    times['6-gradcam'] = ex.act('6-gradcam: clicked "Grad-CAM"', gradcam, ['gradcam'], timeout=120)
    _wait(
        lambda: button.text.strip() == 'Grad-CAM' and button.is_enabled(), 30, 'the button to be free again'
    )
    say(f'6-gradcam: the button said "computing Grad-CAM…" while busy: {bool(busy)}', flush=True)
    assert busy, 'the Grad-CAM button showed no busy state'
    shown = browser.execute_script(_IMAGES, '.mdmf-explorer img')
    assert shown and all(w >= nat - 1 for nat, _, w, _ in shown), f'explorer pictures shrunk: {shown}'
    kinds = [(next(x for x in c.split() if x.startswith('mdmf-img'))[9:], w) for _, _, w, c in shown]
    say(
        f'pictures after Run All: {pictures}; explorer pictures at their own width: {kinds}; '
        f'browser answer times: {json.dumps({k: round(v, 2) for k, v in times.items()})}',
        flush=True,
    )
