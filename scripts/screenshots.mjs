// Takes the README's screenshots of the RabbitMQ management UI with headless
// Chromium (playwright-core): the Queues tab of the `courier` vhost, and a
// dead letter's headers in refunds.dead. Run by scripts/screenshots.sh while
// the demo's queues exist (after `bash scripts/demo.sh`).
import { chromium } from 'playwright-core';

const [url, user, password, vhost, outDir, profile] = process.argv.slice(2);
// A fresh, empty profile directory each run (playwright's persistent context).
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1280, height: 760 },
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
const page = await browser.newPage();
await page.goto(`${url}/`);
await page.fill('input[name="username"]', user);
await page.fill('input[name="password"]', password);
await page.click('input[type="submit"]');
await page.waitForSelector('#logout');

const v = encodeURIComponent(vhost);
await page.selectOption('#show-vhost', vhost);
await page.click('a[href="#/queues"]');
await page.waitForSelector('table.list tbody tr');
await page.waitForTimeout(1500);
await page.screenshot({ path: `${outDir}/queues.png`, fullPage: false });

await page.goto(`${url}/#/queues/${v}/refunds.dead`);
await page.waitForSelector('text=Get messages');
const getButton = page.locator('input[value="Get Message(s)"]');
if (!(await getButton.isVisible())) {
  await page.click('h2:has-text("Get messages")');
}
await getButton.click();
await page.waitForSelector('text=Message 1');
const message = page.locator('div.box:has-text("Message 1")').last();
await message.scrollIntoViewIfNeeded();
await page.waitForTimeout(500);
await message.screenshot({ path: `${outDir}/dead-letter.png` });
await browser.close();
